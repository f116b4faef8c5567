"""The planner's one error type: a bad input, reported as one line that names what to fix."""


class PlannerError(ValueError):
    pass
