"""The one thing every stage takes: the build context.

A stage is `run(ctx: BuildContext) -> None`. What one stage leaves for the next (the root
tree, the base opened in the appliance) travels on the context, not through return values
of different shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.core.record import Build
from builder.pipeline.options import BuildOptions
from builder.pipeline.plan import Plan, Route, make_plan
from builder.recipe.recipe import Recipe


@dataclass
class BuildContext:
    """One bake in progress: what it was asked (recipe, options), what it decided before
    starting (plan, route), where it writes (build, work) and what its stages have made so
    far (fresh_tree, root, opened)."""

    recipe: Recipe
    options: BuildOptions
    plan: Plan
    build: Build
    output_root: Path
    work: Path
    fresh_tree: Path | None = None   # a root tree the base stage made in this bake (not from the cache)
    root: Path | None = None         # the customized root tree the image stage makes an image of (chroot route)
    opened: Any = None               # the base opened for the appliance (stages.baseimage.Opened; guestfs route)

    @property
    def route(self) -> Route:
        """How this bake runs, chosen once when the plan was made."""
        return self.plan.route

    def replan(self) -> None:
        """Make the plan again from what the base stage left (the package checkpoint's key
        follows the base just made); the route and the stage lines stay as planned."""
        stages = self.plan.stages
        self.plan = make_plan(self.recipe, self.output_root)
        self.plan.stages = stages
