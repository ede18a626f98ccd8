"""pdserve.protos"""
