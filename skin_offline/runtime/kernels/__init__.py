"""NumPy hot paths of the runtime (sampling); small pure functions that touch only what they need."""
