"""pdserve.engine.attention"""
