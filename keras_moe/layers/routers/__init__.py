"""Routers: tokens in, one `RoutingDecision` out (see `Router`).

- `Router` (`router.py`): the interface every MoE router implements.
- `TokenChoiceRouter` (`token_choice_router.py`): the base of routers whose
  tokens choose their experts; their `call` returns a `RouterOutput`.
- `TopKRouter`, `HierarchicalRouter`: token choice, flat or as a gating tree.
- `ExpertChoiceRouter`: each expert chooses its tokens.
- `LinearScoring` (`linear_scoring.py`): the `[d, E]` scoring that
  `TopKRouter` and `ExpertChoiceRouter` share.
"""

from keras_moe.layers.routers.expert_choice_router import ExpertChoiceRouter
from keras_moe.layers.routers.hierarchical_router import HierarchicalRouter
from keras_moe.layers.routers.linear_scoring import RouterScores
from keras_moe.layers.routers.router import Router
from keras_moe.layers.routers.router import RoutingDecision
from keras_moe.layers.routers.token_choice_router import RouterOutput
from keras_moe.layers.routers.token_choice_router import TokenChoiceRouter
from keras_moe.layers.routers.top_k_router import TopKRouter
