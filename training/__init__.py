"""tirforge.training"""
