"""Where ranks sit: the pp x dp device mesh, and the process groups for shared parameters.

Global rank = pp_index * dp_degree + dp_index, as ``init_device_mesh`` lays out the shape
``(pp, dp)`` with dims ``("pp", "dp")``: the ranks of one pipeline are ``dp_degree`` apart and each
stage's data-parallel replicas are neighbours. A user may pass their own mesh with those dim names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..codegen import StagePlan
from ..errors import ConfigError

__all__ = ["PipelineMesh", "build_mesh", "tied_groups"]


@dataclass(frozen=True)
class PipelineMesh:
    """This rank's place in the pp x dp grid of ranks, with the groups of its pipeline and its replicas."""

    grid: list[list[int]]  # grid[pp_index][dp_index] = global rank
    pp_index: int
    dp_index: int
    pp_group: Any
    dp_group: Any
    mesh: DeviceMesh | None

    @property
    def n_pp(self) -> int:
        return len(self.grid)

    @property
    def dp_degree(self) -> int:
        return len(self.grid[0])

    def global_rank(self, pp_index: int) -> int:
        """The rank holding pipeline position ``pp_index`` in this rank's data-parallel replica."""
        return self.grid[pp_index][self.dp_index]


def build_mesh(
    device: torch.device, *, dp_degree: int, mesh: DeviceMesh | None, timeout_s: float
) -> PipelineMesh:
    world = dist.get_world_size()
    if mesh is not None:
        if tuple(mesh.mesh_dim_names or ()) != ("pp", "dp"):
            raise ConfigError(
                f"mesh must have dims ('pp', 'dp'), got {mesh.mesh_dim_names}; build it with "
                "init_device_mesh(device_type, (pp, dp), mesh_dim_names=('pp', 'dp'))"
            )
        if mesh.size(1) != dp_degree and dp_degree != 1:
            raise ConfigError(f"dp_degree ({dp_degree}) differs from the mesh's dp size ({mesh.size(1)})")
    elif world % dp_degree:
        raise ConfigError(
            f"world size ({world}) is not a multiple of dp_degree ({dp_degree}); launch n_stages x dp_degree "
            "processes"
        )
    if dp_degree == 1 and mesh is None:
        return PipelineMesh([[r] for r in range(world)], dist.get_rank(), 0, None, None, None)
    if mesh is None:
        mesh = _mesh_with_timeout(device, world // dp_degree, dp_degree, timeout_s)
    grid = mesh.mesh.tolist()
    return PipelineMesh(
        grid,
        mesh.get_local_rank("pp"),
        mesh.get_local_rank("dp"),
        mesh.get_group("pp"),
        mesh.get_group("dp"),
        mesh,
    )


def _mesh_with_timeout(device: torch.device, n_pp: int, dp: int, timeout_s: float) -> DeviceMesh:
    """The mesh ``init_device_mesh(device, (n_pp, dp), mesh_dim_names=("pp", "dp"))`` would build, with
    every group bounded by ``timeout_s`` (its own groups would wait torch's default of 30 minutes, and
    DDP's all-reduce has no other bound)."""
    grid = torch.arange(n_pp * dp).reshape(n_pp, dp)
    me = dist.get_rank()
    timeout = timedelta(seconds=timeout_s)
    mine = {}
    for dim, lines in (("pp", grid.t().tolist()), ("dp", grid.tolist())):
        for ranks in lines:  # every rank creates every group, in the same order
            group = dist.new_group(ranks, timeout=timeout)
            if me in ranks:
                mine[dim] = group
    return DeviceMesh.from_group(
        [mine["pp"], mine["dp"]], device.type, mesh=grid, mesh_dim_names=("pp", "dp")
    )


def tied_groups(
    plans: list[StagePlan], pp_of_stage: dict[int, int], mesh: PipelineMesh, timeout_s: float
) -> list[tuple[torch.nn.Parameter, Any, str]]:
    """Parameters read by stages at several pipeline positions, each with a group over just those ranks
    of this replica. Every rank creates every group, in the same order, as ``new_group`` requires."""
    positions: dict[int, set[int]] = {}
    named: dict[int, tuple[torch.nn.Parameter, str]] = {}
    for plan in plans:
        for attr, param in plan.module.named_parameters():
            if param.requires_grad:
                positions.setdefault(id(param), set()).add(pp_of_stage[plan.index])
                named.setdefault(id(param), (param, plan.state_names.get(attr, attr)))
    groups: dict[tuple[int, ...], Any] = {}
    tied = []
    for pid, (param, name) in sorted(named.items(), key=lambda item: item[1][1]):
        pps = tuple(sorted(positions[pid]))
        if len(pps) < 2:
            continue
        for dp_index in range(mesh.dp_degree):
            ranks = tuple(mesh.grid[pp][dp_index] for pp in pps)
            if ranks not in groups:
                groups[ranks] = dist.new_group(list(ranks), timeout=timedelta(seconds=timeout_s))
        mine = tuple(mesh.global_rank(pp) for pp in pps)
        if dist.get_rank() in mine:
            tied.append((param, groups[mine], name))
    return tied
