import keras

from keras_moe.layers.routers.hierarchical_router import HierarchicalRouter
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.utils.argument_validation import check_int

# `SparseMoE` options that configure a flat router and so do not apply to a
# gating tree.
_FLAT_ROUTER_OPTIONS = (
    "routing",
    "score_function",
    "routed_scaling_factor",
    "expert_groups",
    "group_score",
    "router_bias",
    "bias_update_rate",
    "jitter",
    "noisy_gating",
    "seed",
)


@keras.saving.register_keras_serializable(package="keras_moe")
class HierarchicalMoE(SparseMoE):
    """Hierarchical Mixture-of-Experts: a two-level gating tree over experts.

    The experts are split into `num_groups` groups of `experts_per_group`.
    A top router picks each token's `top_groups` groups, a router inside
    each chosen group picks `top_k` of its experts, and an expert's output is
    weighted by the product of the two gates (Jordan & Jacobs 1994; the
    hierarchical MoE of Shazeer et al. 2017). Tokens then go through the same
    dispatch, capacity and expert bank as `SparseMoE`, with
    `top_groups * top_k` choices per token, so the cost grows with the active
    experts, not with `num_groups * experts_per_group`.

    Args:
        num_groups: int, the number of expert groups.
        experts_per_group: int, experts in each group.
        intermediate_dim: int, the hidden width of each expert.
        top_groups: int in `[1, num_groups]`, groups per token. Defaults
            to 1.
        top_k: int in `[1, experts_per_group]`, experts per chosen group.
            Defaults to 1.
        normalize_top_k: bool, renormalise the chosen weights at each level.
            Defaults to False (the gates keep their probabilities, so both
            levels learn from the task loss even with one choice).
        **kwargs: the other `SparseMoE` arguments: capacity, losses, experts
            and base-layer arguments. The flat-router options
            (`score_function`, `expert_groups`, `bias_update_rate`,
            `router_bias`, ...) do not apply.

    Call arguments:
        inputs: `[..., d]`.
        mask: optional bool `[...]`, False for padding tokens.
        training: bool.

    Returns:
        A tensor of the shape of `inputs`.

    Example:

    >>> import numpy as np
    >>> moe = HierarchicalMoE(
    ...     num_groups=4, experts_per_group=4, intermediate_dim=32,
    ...     top_groups=2, top_k=1)
    >>> x = np.random.normal(size=(2, 10, 32)).astype("float32")
    >>> tuple(moe(x).shape), moe.num_experts
    ((2, 10, 32), 16)
    """

    def __init__(
        self,
        num_groups,
        experts_per_group,
        intermediate_dim,
        top_groups=1,
        top_k=1,
        *,
        normalize_top_k=False,
        **kwargs,
    ):
        not_applicable = sorted(set(kwargs) & set(_FLAT_ROUTER_OPTIONS))
        if not_applicable:
            raise ValueError(
                "`HierarchicalMoE` routes with a two-level gating tree; "
                f"{', '.join(f'`{name}`' for name in not_applicable)} "
                "configure a flat router and do not apply. Received: "
                + ", ".join(f"{name}={kwargs[name]!r}" for name in not_applicable)
            )
        num_groups = check_int("num_groups", num_groups, min_value=1)
        experts_per_group = check_int(
            "experts_per_group", experts_per_group, min_value=1
        )
        # The tree's arguments travel as `SparseMoE` router arguments: its
        # groups are the groups of consecutive experts (`expert_groups`).
        super().__init__(
            num_groups * experts_per_group,
            intermediate_dim,
            top_k,
            expert_groups=num_groups,
            top_groups=top_groups,
            normalize_top_k=normalize_top_k,
            **kwargs,
        )
        self.num_groups = self.router.num_groups
        self.experts_per_group = self.router.experts_per_group

    def _make_router(self, router_initializer, router_arguments):
        # `__init__` refused the flat-router options: the others hold their
        # defaults, which a gating tree has no use for.
        num_groups = router_arguments["expert_groups"]
        return HierarchicalRouter(
            num_groups=num_groups,
            experts_per_group=self.num_experts // num_groups,
            top_groups=router_arguments["top_groups"],
            top_k=router_arguments["top_k"],
            normalize_top_k=router_arguments["normalize_top_k"],
            kernel_initializer=router_initializer,
            dtype=self.router_dtype,
            name="router",
        )

    def get_config(self):
        config = super().get_config()
        del config["num_experts"], config["routing"]
        config["num_groups"] = self.num_groups
        config["experts_per_group"] = self.experts_per_group
        return config

    def _router_config(self):
        router_config = self.router.get_config()
        return {
            "top_groups": router_config["top_groups"],
            "normalize_top_k": router_config["normalize_top_k"],
            "router_initializer": router_config["kernel_initializer"],
        }
