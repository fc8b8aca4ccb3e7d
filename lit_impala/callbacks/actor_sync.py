"""Weight sync: after every ``data.sync_every`` updates the learner's weights go to its actors."""

from __future__ import annotations

import lightning as L


class ActorWeightSync(L.Callback):
    """Publish the learner's weights to the actors after every ``sync_every`` optimizer steps
    (``data.sync_every``; 1 when the data module does not say).

    The weights published are those of the plain network (never a DDP wrapper), tagged with the
    learner's update count, so each unroll records the version it was acted with. Every DDP rank
    publishes to its own actors; nothing here is a collective. The first weights need no publishing: the data
    module starts the actors with the network's weights as they are after a checkpoint restore.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync_every = getattr(trainer.datamodule, "hparams", {}).get("sync_every", 1)
        if trainer.global_step % sync_every == 0:
            trainer.datamodule.publish_weights(pl_module.network, trainer.global_step)
