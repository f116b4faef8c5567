"""The planner: cluster + model + batch -> parallel layout, placement, and predicted cost.

Entry points: ``load_run`` / ``run_from_dict`` (a run description), ``search`` (ranked layouts),
``plan_layout`` (the best one; the orchestrator's re-plan call), ``complete_layout`` (simulate),
``estimate`` (one given layout), ``write_config`` (engine TOML), and ``cli.register``.
"""

from apogee.planner.errors import PlannerError
from apogee.planner.estimate import Estimate, estimate
from apogee.planner.export import layout_to_config, write_config
from apogee.planner.search import complete_layout, plan_layout, search
from apogee.planner.spec import Layout, ModelShape, RunSpec, load_run, run_from_dict

__all__ = ["PlannerError", "Estimate", "estimate", "layout_to_config", "write_config", "complete_layout",
           "plan_layout", "search", "Layout", "ModelShape", "RunSpec", "load_run", "run_from_dict"]
