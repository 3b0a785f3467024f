"""tirforge.trajectories"""
