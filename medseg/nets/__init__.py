"""medseg.nets"""
