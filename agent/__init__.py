"""tirforge.agent"""
