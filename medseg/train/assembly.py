"""Model assembly: the network a run trains, its losses, metrics, optimizer and learning-rate
schedule, the cross-entropy class weights and the output heads' starting bias (class priors).

Precision and seeds are given to what is built, never set process-wide: the layers take the
run's dtype policy (the heads stay float32) and the initializers seeds drawn from ``cfg.seed``.
What depends on the label kind (loss, metrics, targets) is asked of
:class:`medseg.io.classes.LabelKind`.
"""

from __future__ import annotations

from medseg.errors import InputError


def network_spec(cfg):
    """The run's :class:`~medseg.nets.registry.NetworkSpec`: network ``cfg.network`` with the
    configured filters, depth, dropout, L2 and deep supervision (for the networks that take it)."""
    from medseg.nets.registry import NetworkSpec

    return NetworkSpec.from_settings(cfg.network, filters=cfg.unet_filters, depth=cfg.depth,
                                     deep_supervision=cfg.deep_supervision, dropout=cfg.dropout, l2=cfg.l2)


def build_model(cfg, plan, *, sync_batch_norm: bool = False, dtype="float32", seeds=None):
    """The run's network, built by its registered builder (2.5D input channels =
    ``plan.context_slices``; one output channel per class of ``plan.class_spec``, with the label
    kind's activation).

    Args:
        dtype: Keras dtype policy of the layers (``"float32"``, ``"mixed_bfloat16"``...); the
            output heads compute in float32 whatever it is.

    The starting weights depend on ``cfg.seed`` only (the builder's ``seed``); ``seeds``: a
    :func:`medseg.nets.blocks.layer_seeds` stream of the run to draw from instead, so models built
    one after the other get successive draws.
    """
    spec = plan.class_spec
    return network_spec(cfg).build(int(plan.context_slices), spec.num_outputs, sync_batch_norm=sync_batch_norm,
                                   head_activation=spec.kind.activation, dtype=dtype,
                                   seed=seeds if seeds is not None else int(cfg.seed))


def output_heads(cfg) -> list[str]:
    """Names of the model outputs that are trained (all heads with deep supervision)."""
    return network_spec(cfg).output_names


def make_loss(cfg, kind=None):
    """The per-sample segmentation loss of label kind ``kind`` (None: binary): Dice + cross-entropy
    by default (:meth:`medseg.io.classes.LabelKind.loss`)."""
    from medseg.io.classes import BINARY

    return (kind or BINARY).loss(cfg.loss, cfg.ce_class_weights)


def ce_class_weights_for(cfg, plan) -> list[float] | None:
    """The cross-entropy class weights of the run: the config's, checked against the plan's
    classes, else automatic (:func:`medseg.losses.balanced_class_weights` of the classes' body
    shares with two or more classes; None, equal weights, for one class and nested regions).

    Raises:
        InputError: weights given for nested regions, or not one per class.
    """
    spec = plan.class_spec
    where = "training configuration"
    if cfg.ce_class_weights is not None:
        if not spec.kind.takes_ce_class_weights:
            raise InputError(where, "ce_class_weights only with classes: nested regions are trained with a "
                             "binary cross-entropy per region", f"{len(cfg.ce_class_weights)} weights")
        if len(cfg.ce_class_weights) != plan.num_classes:
            raise InputError(where, f"ce_class_weights with {plan.num_classes} values ({', '.join(spec.output_names)})",
                             f"{len(cfg.ce_class_weights)} values {list(cfg.ce_class_weights)}")
        return [float(w) for w in cfg.ce_class_weights]
    fractions = _softmax_class_shares(plan)
    if fractions is None:
        return None
    from medseg.losses import balanced_class_weights

    return [round(w, 4) for w in balanced_class_weights(fractions)]


def output_bias_for(plan) -> list[float] | None:
    """The softmax heads' starting bias: the class priors of the training patients' body
    (:func:`medseg.nets.prior.prior_logits`) with two or more classes; None (zeros, as built)
    for one class, nested regions and plans fitted before the class shares were recorded."""
    fractions = _softmax_class_shares(plan)
    if fractions is None:
        return None
    from medseg.nets.prior import prior_logits

    return prior_logits(fractions)


def _softmax_class_shares(plan) -> list[float] | None:
    """The classes' body shares where they set class weights and head priors: two or more
    classes under one softmax (None for one class, nested regions and older plans)."""
    return plan.class_body_fractions() if plan.class_spec.kind.balances_classes else None


def make_schedule(cfg, learning_rate: float):
    """The per-step :class:`WarmupDecay` schedule; under a time budget (``max_time_s``, with
    ``schedule_over == "budget"``) it also follows the clock (:mod:`medseg.train.budget`)."""
    from medseg.train.schedule import FINETUNE_WARMUP_STEPS, WarmupDecay

    # Fine-tuning (init_from): its own warm-up (FINETUNE_WARMUP_STEPS) unless warm-up epochs are given.
    warmup = cfg.warmup_epochs * cfg.steps_per_epoch or (FINETUNE_WARMUP_STEPS if getattr(cfg, "init_from", None) else 0)
    return WarmupDecay(learning_rate, total_steps=cfg.epochs * cfg.steps_per_epoch, kind=cfg.schedule,
                       power=cfg.poly_power, warmup_steps=warmup,
                       clock=cfg.max_time_s is not None and cfg.schedule_over == "budget")


def make_optimizer(cfg, learning_rate: float, schedule=None, precision: str = "float32"):
    """Adam (AdamW with ``weight_decay``) driven by ``schedule`` (default :func:`make_schedule`);
    with ``precision == "mixed_float16"`` wrapped in Keras' loss scaling, as ``compile`` does
    under that global policy (the policy is given to the layers here, not set globally)."""
    import keras

    schedule = schedule if schedule is not None else make_schedule(cfg, learning_rate)
    if cfg.weight_decay > 0:
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
    if precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def compile_model(model, cfg, learning_rate: float, schedule=None, classes=None, precision: str = "float32") -> None:
    """Compile with one loss per trained output (the network's deep-supervision weights) and the
    label kind's training metrics on its final output (``classes``: the run's
    :class:`~medseg.io.classes.ClassSpec`, None: binary lesions; ``precision``: the dtype policy
    the model's layers were built with).

    Two classes: ``foreground_dice``, ``fg_fraction`` as ever; more: ``dice_<name>`` per class
    and ``mean_dice``; nested regions: none (scored by the whole-volume validation).
    """
    from medseg.io.classes import ClassSpec

    spec = classes if classes is not None else ClassSpec.binary()
    kind = spec.kind
    net = network_spec(cfg)
    heads = net.output_names
    metrics = kind.training_metrics(spec)
    if len(heads) > 1:
        model.compile(
            optimizer=make_optimizer(cfg, learning_rate, schedule, precision),
            loss={h: make_loss(cfg, kind) for h in heads},
            loss_weights=dict(zip(heads, net.loss_weights)),
            metrics={net.final_output: metrics},
            run_eagerly=cfg.run_eagerly,
        )
    else:
        model.compile(optimizer=make_optimizer(cfg, learning_rate, schedule, precision), loss=make_loss(cfg, kind),
                      metrics=metrics, run_eagerly=cfg.run_eagerly)


def targets_for_heads(cfg):
    """``tf.data`` map function giving every trained output its copy of the mask (None for a
    single-output network)."""
    heads = output_heads(cfg)
    if len(heads) == 1:
        return None

    def repeat(images, masks):
        return images, {h: masks for h in heads}

    return repeat
