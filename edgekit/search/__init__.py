"""Compression to a device budget: a budget from the user's text (`budget.py`) and the evolutionary search for
per-unit compression levels that meet it (`evolve.py`, where the `Space` protocol is documented). Family- and
model-agnostic: a pass builds the space (the image models' level database is `passes/levels.py`)."""

from edgekit.search.budget import Budget, parse_budget
from edgekit.search.evolve import BudgetUnreachable, Config, Costs, Level, Scored, SearchResult, Space, Unit, evolve

__all__ = ["Budget", "BudgetUnreachable", "Config", "Costs", "Level", "Scored", "SearchResult", "Space", "Unit",
           "evolve", "parse_budget"]
