"""tirforge.apps"""
