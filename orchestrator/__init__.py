"""Study specs, planning, state, execution and tracking."""
