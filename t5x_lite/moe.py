"""Sparse Mixture-of-Experts MLPs: routers (tokens choose top-k, as Switch and GShard/ST-MoE;
experts choose, Zhou et al. 2022), expert capacity, the dispatch and combine einsums whose
sharding constraints make XLA emit the all-to-all over the `expert` mesh axis, and the
load-balancing and router z-losses.

Dimension letters as in layers.py, plus: G routing groups, S tokens per group, E experts,
C expert capacity (tokens per expert per group), K experts chosen per token.
Routing runs in float32 whatever the activation dtype.
"""
import dataclasses
import enum

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import choices
from t5x_lite import layers

class Router(enum.Enum):
    TOKENS_CHOOSE = "tokens_choose"  # each token picks its top-k experts (Switch, ST-MoE)
    EXPERTS_CHOOSE = "experts_choose"  # each expert picks its top tokens (Zhou et al.)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """A sparse MLP replaces every `sparse_every`-th MLP (layers N-1, 2N-1, ... counting from
    0) of the encoder and of the decoder. Bind as `models.T5Config.moe = @moe.MoeConfig()`.

    Expert capacity per group is max(round(capacity_factor * S / E), min_expert_capacity),
    with the train or eval factor; tokens beyond it are dropped and pass through the layer's
    residual unchanged. Tokens are routed in groups of whole sequences holding at most
    `group_size` tokens (one sequence when a sequence is longer).

    `batch_prioritized_routing` (encoder only: in a decoder it would let later tokens decide
    which earlier ones are dropped) gives capacity to the tokens the router is surest of
    first instead of to the earliest. Experts-choose routing sees every token of its group,
    so in the decoder a token's routing depends on later tokens of its group during training,
    as in Zhou et al. and T5X. `renormalize_weights` rescales each token's K routing weights
    to sum to 1. `extra_dense_mlp` (ST-MoE) adds a dense MLP sublayer, with its own norm and
    residual, before each sparse one.
    """

    num_experts: int = 8
    router: Router = Router.TOKENS_CHOOSE
    num_selected: int = 1
    capacity_factor_train: float = 1.25
    capacity_factor_eval: float = 2.0
    min_expert_capacity: int = 4
    group_size: int = 4096
    jitter_noise: float = 0.0
    batch_prioritized_routing: bool = False
    renormalize_weights: bool = False
    load_balancing_loss_weight: float = 0.01
    router_z_loss_weight: float = 1e-3
    sparse_every: int = 2
    expert_d_ff: int | None = None  # None: T5Config.d_ff.
    extra_dense_mlp: bool = False

    def __post_init__(self):
        def fail(field: str, problem: str):
            raise ValueError(f"moe.MoeConfig.{field} {problem}, got {getattr(self, field)!r}")

        choices.set_parsed(self, "router", Router, "moe.MoeConfig.router")
        for field in ("num_experts", "num_selected", "min_expert_capacity", "group_size",
                      "sparse_every"):
            if getattr(self, field) < 1:
                fail(field, "must be >= 1")
        if self.num_selected > self.num_experts:
            fail("num_selected", f"(top-k) must be <= num_experts = {self.num_experts}")
        for field in ("capacity_factor_train", "capacity_factor_eval"):
            if not getattr(self, field) > 0:
                fail(field, "must be > 0")
        if not 0.0 <= self.jitter_noise < 1.0:
            fail("jitter_noise", "must be in [0, 1)")
        for field in ("load_balancing_loss_weight", "router_z_loss_weight"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        if self.expert_d_ff is not None and self.expert_d_ff < 1:
            fail("expert_d_ff", "must be >= 1 or None")

    def is_sparse(self, layer_index: int) -> bool:
        return (layer_index + 1) % self.sparse_every == 0

    def expert_capacity(self, tokens_per_group: int, deterministic: bool) -> int:
        factor = self.capacity_factor_eval if deterministic else self.capacity_factor_train
        return max(int(round(factor * tokens_per_group / self.num_experts)),
                   self.min_expert_capacity)


def check_expert_axis(config: MoeConfig | None, expert_axis_size: int) -> None:
    """Experts are split evenly over the mesh's expert axis, or the run stops here."""
    if config is not None and config.num_experts % expert_axis_size:
        raise ValueError(f"moe.MoeConfig.num_experts = {config.num_experts} does not divide "
                         f"over the mesh's expert axis of {expert_axis_size}: set num_experts to"
                         f" a multiple of it or partitioning.MeshConfig.expert to a divisor")


def rows_per_group(batch_size: int, length: int, group_size: int) -> int:
    """The most whole sequences (a divisor of batch_size) whose tokens fit in group_size."""
    rows = max(1, min(batch_size, group_size // length))
    while batch_size % rows:
        rows -= 1
    return rows


def tokens_choose(probs_GSE: jax.Array, valid_GS: jax.Array, num_selected: int,
                  capacity: int, batch_prioritized: bool = False, renormalize: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
    """Each valid token picks its `num_selected` most probable experts.

    An expert takes tokens in priority order until it holds `capacity`: all tokens' first
    choices before any second choice (GShard); within a choice, tokens in sequence order, or
    by descending top router probability when `batch_prioritized`. Returns float32 dispatch
    [G, S, E, C] (1 where token s fills slot c of expert e) and combine [G, S, E, C] (the
    dispatch times the token's routing weight for that expert).
    """
    gates_GSK, experts_GSK = jax.lax.top_k(probs_GSE, num_selected)
    if renormalize:
        gates_GSK = gates_GSK / jnp.sum(gates_GSK, axis=-1, keepdims=True)
    num_experts = probs_GSE.shape[-1]
    chosen_GSKE = (jax.nn.one_hot(experts_GSK, num_experts, dtype=jnp.int32)
                   * valid_GS[:, :, None, None].astype(jnp.int32))
    order_GS = jnp.broadcast_to(jnp.arange(valid_GS.shape[1]), valid_GS.shape)
    if batch_prioritized:
        order_GS = jnp.argsort(-gates_GSK[:, :, 0], axis=1, stable=True)
    ranked_GSKE = jnp.take_along_axis(chosen_GSKE, order_GS[:, :, None, None], axis=1)
    # Count each expert's claims in priority order: choice k of every token, then k + 1.
    ranked_GKSE = ranked_GSKE.transpose(0, 2, 1, 3)
    groups, choices, tokens, _ = ranked_GKSE.shape
    claims = jnp.cumsum(ranked_GKSE.reshape(groups, choices * tokens, num_experts), axis=1)
    slot_GKSE = claims.reshape(ranked_GKSE.shape) * ranked_GKSE - 1  # -1 where not chosen.
    unranked_GSKE = jnp.take_along_axis(slot_GKSE.transpose(0, 2, 1, 3),
                                        jnp.argsort(order_GS, axis=1)[:, :, None, None], axis=1)
    # one_hot of -1 (not chosen) or of a slot >= capacity (dropped) is all zeros.
    slots_GSKEC = jax.nn.one_hot(unranked_GSKE, capacity, dtype=jnp.float32)
    dispatch_GSEC = jnp.sum(slots_GSKEC, axis=2)
    combine_GSEC = jnp.einsum("GSKEC,GSK->GSEC", slots_GSKEC, gates_GSK.astype(jnp.float32))
    return dispatch_GSEC, combine_GSEC


def experts_choose(probs_GSE: jax.Array, valid_GS: jax.Array, capacity: int
                   ) -> tuple[jax.Array, jax.Array]:
    """Each expert takes the `capacity` valid tokens of its group with the highest router
    probability for it (a token may go to several experts or none). Returns dispatch and
    combine as `tokens_choose` does; capacity is capped at the group's length."""
    tokens = probs_GSE.shape[1]
    capacity = min(capacity, tokens)
    # Padding ranks below every real token (probabilities are >= 0) and is masked below.
    scores_GES = jnp.where(valid_GS[:, None, :], probs_GSE.transpose(0, 2, 1), -1.0)
    gates_GEC, token_GEC = jax.lax.top_k(scores_GES, capacity)
    taken_GEC = jnp.take_along_axis(valid_GS[:, None, :], token_GEC, axis=2)
    dispatch_GECS = (jax.nn.one_hot(token_GEC, tokens, dtype=jnp.float32)
                     * taken_GEC[..., None].astype(jnp.float32))
    dispatch_GSEC = dispatch_GECS.transpose(0, 3, 1, 2)
    combine_GSEC = dispatch_GSEC * gates_GEC[:, None, :, :]
    return dispatch_GSEC, combine_GSEC


def load_balancing_loss(probs_GSE: jax.Array, valid_GS: jax.Array, num_selected: int
                        ) -> jax.Array:
    """Switch Transformer's auxiliary loss E * sum_e f_e * P_e over the valid tokens, where
    f_e is the share of the tokens' K choices that name expert e and P_e the mean router
    probability of e. It is 1 when routing is uniform and grows as it concentrates."""
    num_experts = probs_GSE.shape[-1]
    valid_GS1 = valid_GS[..., None].astype(jnp.float32)
    count = jnp.maximum(jnp.sum(valid_GS1), 1.0)
    _, experts_GSK = jax.lax.top_k(probs_GSE, num_selected)
    chosen_GSE = jnp.sum(jax.nn.one_hot(experts_GSK, num_experts), axis=2)
    choice_share_E = jnp.sum(chosen_GSE * valid_GS1, axis=(0, 1)) / (count * num_selected)
    mean_prob_E = jnp.sum(probs_GSE * valid_GS1, axis=(0, 1)) / count
    return num_experts * jnp.sum(choice_share_E * mean_prob_E)


def router_z_loss(logits_GSE: jax.Array, valid_GS: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss: the mean over valid tokens of logsumexp(router logits)^2."""
    valid = valid_GS.astype(jnp.float32)
    log_z_GS = jax.nn.logsumexp(logits_GSE, axis=-1)
    return jnp.sum(jnp.square(log_z_GS) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def routing_metrics(dispatch_GSEC: jax.Array, valid_GS: jax.Array, choices_per_token: int
                    ) -> dict[str, jax.Array]:
    """expert_fraction [E]: each expert's share of the dispatched tokens; dropped_fraction:
    the share of the valid tokens' expert choices (tokens choose) or of the valid tokens
    (experts choose: tokens no expert took) that no expert processed."""
    per_expert_E = jnp.sum(dispatch_GSEC, axis=(0, 1, 3))
    valid_tokens = jnp.maximum(jnp.sum(valid_GS.astype(jnp.float32)), 1.0)
    if choices_per_token:
        processed = jnp.sum(per_expert_E) / choices_per_token
    else:
        processed = jnp.sum(jnp.max(jnp.sum(dispatch_GSEC, axis=3), axis=2))
    return {"expert_fraction": per_expert_E / jnp.maximum(jnp.sum(per_expert_E), 1.0),
            "dropped_fraction": 1.0 - processed / valid_tokens}


class SparseMlp(nn.Module):
    """A router and `num_experts` MLPs in place of one dense MLP.

    Parameters: router/kernel [D, E] and experts/<wi_0|wi_1|wi|wo>/kernel, each the dense
    MLP's kernel with a leading expert dimension. Each call sows its routing metrics and
    losses into the "intermediates" collection as `moe_metrics`.
    """

    config: layers.LayerConfig
    moe: MoeConfig
    causal: bool = False

    @nn.compact
    def __call__(self, inputs_BTD: jax.Array, deterministic: bool,
                 valid_BT: jax.Array | None = None) -> jax.Array:
        moe, (batch, length, width) = self.moe, inputs_BTD.shape
        valid_BT = jnp.ones((batch, length), bool) if valid_BT is None else valid_BT > 0
        rows = rows_per_group(batch, length, moe.group_size)
        groups, tokens = batch // rows, rows * length
        x_GSD = layers.constrain(inputs_BTD.reshape(groups, tokens, width),
                                 ("batch", "length", "embed"))
        valid_GS = valid_BT.reshape(groups, tokens)
        logits_GSE = self._router_logits(x_GSD, deterministic)
        probs_GSE = jax.nn.softmax(logits_GSE, axis=-1)
        capacity = moe.expert_capacity(tokens, deterministic)
        if moe.router is Router.TOKENS_CHOOSE:
            dispatch_GSEC, combine_GSEC = tokens_choose(
                probs_GSE, valid_GS, moe.num_selected, capacity,
                moe.batch_prioritized_routing and not self.causal, moe.renormalize_weights)
            balance = load_balancing_loss(probs_GSE, valid_GS, moe.num_selected)
        else:
            dispatch_GSEC, combine_GSEC = experts_choose(probs_GSE, valid_GS, capacity)
            balance = jnp.zeros((), jnp.float32)  # Balanced by construction.
        dtype = self.config.dtype
        dispatch_GSEC = layers.constrain(dispatch_GSEC, ("batch", "length", None, None))
        # Resharding G (split over data, fsdp and expert) to E (over expert): the all-to-all.
        expert_inputs_EGCD = layers.constrain(
            jnp.einsum("GSEC,GSD->EGCD", dispatch_GSEC.astype(dtype), x_GSD),
            ("expert", "expert_group", None, "embed"))
        expert_outputs_EGCD = layers.Mlp(
            self._expert_config(), num_experts=moe.num_experts, name="experts")(
                expert_inputs_EGCD, deterministic)
        output_GSD = jnp.einsum("GSEC,EGCD->GSD", combine_GSEC.astype(dtype),
                                expert_outputs_EGCD)
        self.sow("intermediates", "moe_metrics", {
            "load_balancing_loss": balance,
            "router_z_loss": router_z_loss(logits_GSE, valid_GS),
            **routing_metrics(dispatch_GSEC, valid_GS,
                              moe.num_selected if moe.router is Router.TOKENS_CHOOSE else 0)})
        return layers.constrain(output_GSD.reshape(batch, length, width),
                                ("batch", "length", "embed"))

    def _router_logits(self, x_GSD: jax.Array, deterministic: bool) -> jax.Array:
        """Float32 router logits [G, S, E], with multiplicative jitter on the inputs when
        training."""
        router_inputs_GSD = x_GSD.astype(jnp.float32)
        if self.moe.jitter_noise and not deterministic:
            router_inputs_GSD *= jax.random.uniform(
                self.make_rng("dropout"), router_inputs_GSD.shape, jnp.float32,
                1.0 - self.moe.jitter_noise, 1.0 + self.moe.jitter_noise)
        # A small initial scale keeps early routing near uniform (Switch Transformer, 2.4).
        init = nn.initializers.variance_scaling(0.1, "fan_in", "truncated_normal")
        router = nn.Dense(self.moe.num_experts, use_bias=False, dtype=jnp.float32,
                          name="router", kernel_init=layers.partitioned(init, ("embed", None)))
        return layers.constrain(router(router_inputs_GSD), ("batch", "length", None))

    def _expert_config(self) -> layers.LayerConfig:
        if self.moe.expert_d_ff is None:
            return self.config
        return dataclasses.replace(self.config, d_ff=self.moe.expert_d_ff)


def layer_metrics(intermediates) -> dict[str, dict[str, jax.Array]]:
    """{layer name: its sown moe_metrics} from a module's "intermediates" collection."""
    found = {}
    for path, value in jax.tree_util.tree_flatten_with_path(
            intermediates, is_leaf=lambda x: isinstance(x, dict) and "router_z_loss" in x)[0]:
        keys = [str(getattr(key, "key", key)) for key in path]
        if "moe_metrics" in keys:
            found[keys[0]] = value
    return found


def metric_sums(layer_metrics: dict[str, dict[str, jax.Array]], config: MoeConfig,
                weight: jax.Array) -> dict[str, jax.Array]:
    """The auxiliary loss to add to the summed training loss (`moe_loss`: the weighted sum
    over sparse layers of load-balancing and router z-losses), those two losses summed over
    layers, and every layer's metrics as `moe/<layer>/<name>`; each multiplied by `weight`
    (the batch's summed target weight, by which the trainer divides every sum)."""
    balance = sum(metrics["load_balancing_loss"] for metrics in layer_metrics.values())
    z_loss = sum(metrics["router_z_loss"] for metrics in layer_metrics.values())
    sums = {"moe_loss": (config.load_balancing_loss_weight * balance
                         + config.router_z_loss_weight * z_loss) * weight,
            "moe_load_balancing_loss": balance * weight, "moe_router_z_loss": z_loss * weight}
    for layer, metrics in layer_metrics.items():
        sums.update({f"moe/{layer}/{name}": value * weight for name, value in metrics.items()})
    return sums
