"""medseg.cli"""
