"""pdserve.engine.models"""
