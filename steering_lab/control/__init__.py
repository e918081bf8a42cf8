"""Deciding when and how hard to steer, beyond adding a vector: PPLM."""
