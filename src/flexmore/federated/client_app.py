"""The data owner's side (a Flower ClientApp): check the public model, train one expert on local data by
the FlexOlmo recipe (`flexmore.training.expert`), and reply with that expert's tensors only.

A reply carries three records: `expert` (ArrayRecord: the expert's matrices or low-rank factors and its
router rows, float32; see `wire`), `metrics` (MetricRecord: num-examples, held-out loss before/after)
and `expert-info` (ConfigRecord: name, kind, rank). No documents, tokens or data statistics leave.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .config import NodeSpec, TrainRequest
from .wire import FULL, LOW_RANK, full_expert_tensors, low_rank_expert_tensors, to_array_record

# Error code of a deliberate refusal (public-model mismatch); Flower's own codes are 0-8.
REFUSED = 100
SKIPPED = "skipped"

app = ClientApp()


class PublicModelMismatch(ValueError):
    pass


def public_sha256(folder: str) -> str:
    from flexmore.storage import FlexOlmoCheckpoint, fingerprint, public_digest, resolve_source

    return fingerprint(public_digest(FlexOlmoCheckpoint(resolve_source(folder)), 0))


def check_public(node: NodeSpec, request: TrainRequest) -> str:
    """The local copy of the public model to train on, if its content hash is the server's."""
    folder = node.public or request.public
    try:
        found = public_sha256(folder)
    except (OSError, ValueError) as err:
        raise PublicModelMismatch(f"node {node.name!r}: cannot read the public model at {folder} ({err})") from err
    if found != request.public_sha256:
        raise PublicModelMismatch(
            f"node {node.name!r} refuses to train: its public model {folder} has content hash {found[:16]}..., "
            f"the server's has {request.public_sha256[:16]}...; every expert must be trained against the same "
            "public model (copy the server's exactly)"
        )
    return folder


def train_local_expert(node: NodeSpec, request: TrainRequest, public: str, workdir: Path) -> RecordDict:
    """Train with the training library in `workdir`; the reply's records."""
    from dataclasses import replace

    from transformers.utils import logging as hf_logging

    from flexmore.training.expert import ExpertTrainConfig, train_expert

    hf_logging.disable_progress_bar()
    out = workdir / node.name
    config = ExpertTrainConfig(
        public=public,
        data=node.data,
        out=out,
        name=node.name,
        rank=request.rank,
        train=replace(request.train, device=node.device),
        heldout_fraction=request.heldout_fraction,
        max_docs=request.max_docs,
        router_docs=request.router_docs,
    )
    start = time.perf_counter()
    result = train_expert(config, resume=False)
    tensors = full_expert_tensors(out) if request.rank is None else low_rank_expert_tensors(out)
    return RecordDict(
        {
            "expert": to_array_record(tensors),
            "metrics": MetricRecord(
                {
                    # sequences of seq_len tokens trained on: FedAvg's notion of local examples
                    "num-examples": result.train.tokens // request.train.seq_len,
                    "num-tokens": result.train.tokens,
                    "loss-before": float(result.public_loss),
                    "loss-after": float(result.expert_loss),
                    "train-seconds": time.perf_counter() - start,
                    "trainable-parameters": result.trainable_parameters,
                }
            ),
            "expert-info": ConfigRecord(
                {"name": node.name, "kind": FULL if request.rank is None else LOW_RANK, "rank": request.rank or 0}
            ),
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    request = TrainRequest.from_record(msg.content["config"])
    node = NodeSpec.from_context(context.node_config, context.run_config)
    if node.name in request.skip:  # a resumed run: the server already holds this expert
        info = ConfigRecord({"name": node.name, "status": SKIPPED})
        return Message(RecordDict({"expert-info": info}), reply_to=msg)
    try:
        public = check_public(node, request)
    except PublicModelMismatch as err:
        # A deliberate refusal, not a crash: an error reply with the reason, for the server to report.
        return Message(Error(code=REFUSED, reason=str(err)), reply_to=msg)
    workdir = context.node_config.get("workdir")
    with tempfile.TemporaryDirectory(prefix="flexmore-expert-", dir=str(workdir) if workdir else None) as tmp:
        content = train_local_expert(node, request, public, Path(tmp))
    return Message(content, reply_to=msg)
