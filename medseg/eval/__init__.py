"""medseg.eval"""
