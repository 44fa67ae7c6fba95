"""The variational quantum circuit of `VQCGeneratedLinear` (PennyLane, torch interface).

One circuit evaluation per chunk, all chunks in one broadcast call:

    |ctx_c>  = AmplitudeEmbedding(context_c)                 (2^n_wires learned amplitudes, normalised)
    repeat n_layers:  RX, RY, RZ (trainable) on every wire;  CNOT ring i -> i+1 (mod n_wires)
    z_c      = (<Z_0>, ..., <Z_{n_wires-1}>)                 in [-1, 1]^n_wires

Noise (training mode only, never at inference): after every layer each wire suffers a depolarizing
channel of probability p, rho -> (1 - p) rho + p/3 (X rho X + Y rho Y + Z rho Z).
- default (`exact=False`): one sampled quantum trajectory per chunk and call on `default.qubit`: with
  probability p one of X, Y, Z (uniformly) is applied, as RX(pi), RY(pi) or RZ(pi) (equal up to a global
  phase); the expectation over trajectories is exactly the channel's output (unbiased, cheap).
- `exact=True`: `qml.DepolarizingChannel` on `default.mixed` (the density matrix, 4^n_wires entries; slow).

PennyLane is imported lazily (inside functions), so `import riverone_hf` never imports it.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
from torch import nn

MAX_VQC_WIRES = 12  # state-vector simulation: 2^wires amplitudes per circuit evaluation
MAX_VQC_EXACT_NOISE_WIRES = 8  # default.mixed: a 4^wires density matrix per circuit evaluation
PENNYLANE_INSTALL_COMMAND = "pip install 'riverone_hf[vqc]'  (or: pip install pennylane)"


@functools.cache
def is_pennylane_available() -> bool:
    try:
        return importlib.util.find_spec("pennylane") is not None
    except ValueError:  # sys.modules["pennylane"] is None: imports of it are blocked
        return False


def require_pennylane(what: str = "VQC-generated layers") -> None:
    """Raise ImportError with the install command when PennyLane is missing."""
    if not is_pennylane_available():
        raise ImportError(f"{what}: PennyLane is required but not installed; {PENNYLANE_INSTALL_COMMAND}")


@functools.cache
def _qnode(n_wires: int, n_layers: int, device_name: str):
    """A broadcastable QNode `(contexts [B, 2^n], weights [L, n, 3], flips, p) -> n_wires tensors [B]`."""
    import pennylane as qml

    device = qml.device(device_name, wires=n_wires)

    @qml.qnode(device, interface="torch", diff_method="backprop")
    def circuit(contexts, weights, flips=None, probability=None):
        qml.AmplitudeEmbedding(contexts, wires=range(n_wires), normalize=True)
        for layer in range(n_layers):
            for wire in range(n_wires):
                qml.RX(weights[layer, wire, 0], wires=wire)
                qml.RY(weights[layer, wire, 1], wires=wire)
                qml.RZ(weights[layer, wire, 2], wires=wire)
            if n_wires > 1:
                for wire in range(n_wires):
                    qml.CNOT(wires=[wire, (wire + 1) % n_wires])
            for wire, gates in (flips or {}).get(layer, {}).items():
                for gate, angles in gates.items():
                    getattr(qml, gate)(angles, wires=wire)
            if probability is not None:
                for wire in range(n_wires):
                    qml.DepolarizingChannel(probability, wires=wire)
        return [qml.expval(qml.PauliZ(wire)) for wire in range(n_wires)]

    return circuit


def sample_pauli_flips(
    n_chunks: int, n_wires: int, n_layers: int, probability: float, generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> dict[int, dict[int, dict[str, torch.Tensor]]]:
    """One trajectory of the depolarizing channel per chunk: {layer: {wire: {"RX"|"RY"|"RZ": angles [B]}}}.

    Each (chunk, layer, wire) independently gets, with probability `probability`, one of X, Y, Z
    (uniformly), written as a pi rotation (angle 0 elsewhere). Gates no chunk needs are left out. The
    draws are made on the CPU (`generator`), the angles are put on `device`.
    """
    draw = torch.rand(n_layers, n_wires, n_chunks, generator=generator)
    which = torch.randint(0, 3, (n_layers, n_wires, n_chunks), generator=generator)
    hit = draw < probability
    flips: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for layer, wire in zip(*torch.nonzero(hit.any(-1), as_tuple=True)):
        layer, wire = int(layer), int(wire)
        gates = {}
        for index, gate in enumerate(("RX", "RY", "RZ")):
            mask = hit[layer, wire] & (which[layer, wire] == index)
            if mask.any():
                gates[gate] = mask.to(device=device, dtype=torch.float32) * math.pi
        flips.setdefault(layer, {})[wire] = gates
    return flips


class CircuitFeatures(nn.Module):
    """Per-chunk circuit measurements: learned contexts [n_chunks, 2^n_wires] and rotation angles
    [n_layers, n_wires, 3] -> PauliZ expectations [n_chunks, n_wires].

    Args:
        n_chunks: number of chunks (one context each).
        n_wires: qubits; the context has 2^n_wires amplitudes.
        n_layers: layers of RX, RY, RZ + CNOT ring.
        noise_probability: depolarizing probability per wire and layer, applied in training mode only.
        exact_noise: simulate the channel exactly on `default.mixed` instead of sampling trajectories.
    """

    def __init__(self, n_chunks: int, n_wires: int, n_layers: int, noise_probability: float = 0.0,
                 exact_noise: bool = False, device=None, dtype=None):
        super().__init__()
        require_pennylane()
        if exact_noise and n_wires > MAX_VQC_EXACT_NOISE_WIRES:
            raise ValueError(
                f"`exact_noise` simulates a 4^n_wires density matrix; n_wires={n_wires} is more than "
                f"{MAX_VQC_EXACT_NOISE_WIRES}. Use the sampled noise (exact_noise=False) or fewer wires"
            )
        self.n_wires, self.n_layers = n_wires, n_layers
        self.noise_probability, self.exact_noise = float(noise_probability), exact_noise
        factory = {"device": device, "dtype": dtype}
        self.contexts = nn.Parameter(torch.empty(n_chunks, 2**n_wires, **factory))
        self.weights = nn.Parameter(torch.empty(n_layers, n_wires, 3, **factory))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Distinct random contexts per chunk (so the chunks' measurements differ) and small angles."""
        if self.contexts.is_meta:
            return
        self.contexts.copy_(torch.randn(self.contexts.shape, generator=generator))
        self.weights.copy_(torch.rand(self.weights.shape, generator=generator) * (2 * math.pi))

    def forward(self) -> torch.Tensor:
        noisy = self.training and self.noise_probability > 0
        contexts, weights = self.contexts.float(), self.weights.float()  # the simulator wants >= float32
        if noisy and self.exact_noise:
            outputs = _qnode(self.n_wires, self.n_layers, "default.mixed")(
                contexts, weights, probability=self.noise_probability
            )
        else:
            flips = None
            if noisy:
                flips = sample_pauli_flips(contexts.shape[0], self.n_wires, self.n_layers, self.noise_probability,
                                           device=contexts.device)
            outputs = _qnode(self.n_wires, self.n_layers, "default.qubit")(contexts, weights, flips=flips)
        return torch.stack([o.to(torch.float32) for o in outputs], dim=-1).reshape(contexts.shape[0], self.n_wires)

    def extra_repr(self) -> str:
        noise = f"noise_probability={self.noise_probability}, exact_noise={self.exact_noise}"
        return f"n_chunks={self.contexts.shape[0]}, n_wires={self.n_wires}, n_layers={self.n_layers}, {noise}"


class LearnedFeatures(nn.Module):
    """The classical ablation of `CircuitFeatures`: a learned vector [n_chunks, n_features] per chunk,
    fed to the same hypernetwork instead of the circuit's measurements."""

    def __init__(self, n_chunks: int, n_features: int, device=None, dtype=None):
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(n_chunks, n_features, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if not self.vectors.is_meta:
            self.vectors.copy_(torch.rand(self.vectors.shape, generator=generator) * 2 - 1)  # like <Z> in [-1, 1]

    def forward(self) -> torch.Tensor:
        return self.vectors.float()
