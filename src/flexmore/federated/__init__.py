"""Federated expert training on Flower: the only package that imports `flwr`.

Every data owner runs a SuperNode whose ClientApp (`client_app`) trains one expert against the frozen
public model on its own data and replies with that expert only; the ServerApp (`server_app`,
`coordinator`) saves each expert as it arrives (`store`) and composes the FlexMoRE mixture. `wire`
converts tensors to Flower records and counts bytes; `runner` launches a simulation (Ray) or a loopback
deployment (SuperLink + SuperNodes as processes). Import the submodules; this package imports nothing.
"""
