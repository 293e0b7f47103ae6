"""FLEx: federated fine-tuning of a pretrained MoE LLM with selective aggregation, expert grafting and
an adaptive sigmoid gate (seeds/flex-summary.txt; docs/flex.md).

- `adapters`: finds the MoE blocks, experts and routers of each supported `transformers` family;
- `graft`: records a block's input/output on calibration data, picks and prunes the expert to graft;
- `gate`: the grafted expert and its sigmoid gate, attached to a block as `y = MoE(x) + g(x) E(x)`;
- `shared`: which parameters train and which travel (PEFT LoRA), per method;
- `aggregate`: FedAvg / FedProx / FedAvgM math on the shared tensors, and the server's checkpoint;
- `tasks`: generated instruction families with checked answers, partitioned over clients;
- `metrics`: ROUGE-L, expert load balance, held-out loss;
- `client`: one client's round (load, graft, train, evaluate, save personal parts);
- `pretrain`: the embedded default tiny Qwen2-MoE; `report`: table and plots.

No Flower here: `flexmore.federated.flex_*` wraps this package in a ServerApp/ClientApp.
"""
