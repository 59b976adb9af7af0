"""Which adapter a request reads, chosen by its ``model`` field (TGI: ``parameters.adapter_id``).

    <served>            the live aligned adapter, as training publishes it (the default)
    <served>:base       the base model, no adapter
    <served>@<version>  a version the trainer published, pinned: it answers the same while
                        training goes on (the last ``--keep-versions`` versions, from memory or
                        their checkpoints; loaded on the first request that names it)
    <lora_name>         an adapter loaded at run time from a PEFT directory
                        (``POST /v1/load_lora_adapter``, vLLM's route and body)

Every one of them is served in the same iterations as the others (``engine.lora``). Loading and
unloading change the model's modules, so they run on the worker thread between two iterations
(``AsyncEngine.run_on_worker``). Internal adapter names are never reused (``loaded3``,
``pinned12``), so the prefix cache's namespace of an unloaded adapter can never serve another's
K/V. Adapters need LoRA layers on the model: with training off (``--no-training``) only the
served model and ``:base`` are there.

With ``--tenants`` every name is the caller's own: ``<served>`` is the tenant's live adapter,
``<served>@<version>`` the tenant's versions, and a runtime adapter belongs to the tenant that
loaded it; another tenant's is a 404, as if it did not exist. ``:base`` is everyone's.

Runtime adapters are read from the server's own file system, as vLLM does; ``--api-key`` guards
these routes like every other. Only ``adapter_model.safetensors`` is read (never a pickle), and
an adapter may only target layers the served adapter targets.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from engine.lora import BASE
from server.errors import ApiError

BASE_SUFFIX = ":base"


@dataclass(frozen=True, slots=True)
class AdapterChoice:
    """What a request's ``model`` resolved to."""

    name: str  # as the API shows it (responses' ``model``)
    adapter: str | None  # the engine's adapter (RequestOptions.adapter)
    version: int | None = None  # a pinned version's number


@dataclass(slots=True)
class _Loaded:
    internal: str
    path: str


Tenant = str | None  # None: no tenant (the default adapter)


class Adapters:
    def __init__(self, engine, served_name: str, aliases: frozenset[str]) -> None:
        self.engine = engine
        self.served_name = served_name
        self.aliases = aliases
        self._loaded: dict[tuple[Tenant, str], _Loaded] = {}  # (owner, lora_name) -> its adapter
        # (tenant, version) -> internal name, least recently asked for first; a tenant keeps at
        # most --keep-versions loaded (the least recently asked for that no request is on goes)
        self._pinned: OrderedDict[tuple[Tenant, int], str] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()  # one change to the model's adapters at a time

    def _training(self, tenant: Tenant):
        return self.engine.training_for(tenant)

    @property
    def has_lora_layers(self) -> bool:
        return self.engine.training is not None

    def live_adapter(self, tenant: Tenant) -> str | None:
        """The engine's name of the adapter a tenant's requests read by default."""
        return None if tenant is None else self._training(tenant).serving_name

    # -- choosing -------------------------------------------------------------------------------

    async def resolve(self, model: str | None, field: str = "model", tenant: Tenant = None) -> AdapterChoice:
        """The adapter a request's ``model`` names (for ``tenant``), loading a pinned version on
        first use; 404 naming ``field`` for a name this server does not serve to it."""
        if model is None or model in self.aliases:
            return AdapterChoice(self.served_name, self.live_adapter(tenant))
        if (tenant, model) in self._loaded:
            return AdapterChoice(model, self._loaded[(tenant, model)].internal)
        for alias in self.aliases:
            if model == alias + BASE_SUFFIX:
                return AdapterChoice(f"{self.served_name}{BASE_SUFFIX}", BASE)
            if model.startswith(alias + "@"):
                version = model[len(alias) + 1:]
                if version.isdigit():
                    return await self._pin(int(version), field, tenant)
        raise ApiError(404, f"The {field} `{model}` does not exist; this server serves `{self.served_name}`, "
                            f"`{self.served_name}{BASE_SUFFIX}`, `{self.served_name}@VERSION` and the adapters "
                            f"that /v1/models lists.", field, "model_not_found")

    async def _pin(self, version: int, field: str, tenant: Tenant) -> AdapterChoice:
        name = f"{self.served_name}@{version}"
        training = self._training(tenant)
        if training is None:
            raise ApiError(404, f"The model `{name}` does not exist: no adapter versions without training.", field,
                           "model_not_found")
        async with self._lock:
            if (tenant, version) not in self._pinned:
                state = await training.version_state(version, self.engine.run_on_worker)
                if state is None:
                    kept = ", ".join(str(v) for v in self.versions(tenant)) or "none"
                    raise ApiError(404, f"The model `{name}` does not exist: version {version} is not kept "
                                        f"(kept: {kept}).", field, "model_not_found")
                internal = f"pinned{version}" if tenant is None else f"pinned_{tenant}_{version}"
                await self._evict_pins(tenant, training, training.config.keep_versions - 1)
                await self._add(internal, training.lora_config(), state)
                self._pinned[(tenant, version)] = internal
            self._pinned.move_to_end((tenant, version))
        return AdapterChoice(name, self._pinned[(tenant, version)], version)

    async def _evict_pins(self, tenant: Tenant, training, keep: int) -> None:
        """Unload the tenant's least recently asked-for pinned versions until at most ``keep``
        stay, of those that no request is on and that load again when asked for (kept in memory
        or on disk: a pin whose version left both stays loaded, so it keeps answering)."""
        mine = [key for key in self._pinned if key[0] == tenant]
        in_use = {seq.options.adapter for seq in self.engine.core.sequences.values()}
        reloadable = set(training.executor.kept_versions) | set(training.checkpoint_versions())
        excess = len(mine) - keep
        for key in mine:
            if excess <= 0:
                break
            internal = self._pinned[key]
            if internal in in_use or key[1] not in reloadable:
                continue
            excess -= 1
            del self._pinned[key]
            await self.engine.run_on_worker(lambda internal=internal: self._delete(internal))

    def versions(self, tenant: Tenant = None) -> list[int]:
        """Versions a tenant's request may pin now."""
        training = self._training(tenant)
        if training is None:
            return []
        pinned = {v for t, v in self._pinned if t == tenant}
        return sorted(set(training.executor.kept_versions) | set(training.checkpoint_versions()) | pinned)

    # -- loading at run time ---------------------------------------------------------------------

    async def load(self, lora_name: str, lora_path: str, tenant: Tenant = None) -> None:
        """``POST /v1/load_lora_adapter``: 400 naming the field for a bad name or path."""
        if not lora_name or lora_name in self.aliases or "@" in lora_name or lora_name.endswith(BASE_SUFFIX):
            raise ApiError(400, f"lora_name `{lora_name}` is empty or names the served model", "lora_name",
                           "invalid_value")
        if not self.has_lora_layers:
            raise ApiError(400, "this server has no LoRA layers to load an adapter into (it runs with training "
                                "off)", "lora_path", "invalid_value")
        from peft import LoraConfig
        from safetensors.torch import load_file

        def read() -> tuple:
            path = Path(lora_path)
            config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
            if not config_file.is_file() or not weights.is_file():
                raise ApiError(400, f"lora_path `{lora_path}` is not a PEFT adapter directory (it needs "
                                    "adapter_config.json and adapter_model.safetensors)", "lora_path", "invalid_value")
            try:
                raw = json.loads(config_file.read_text())
                config = LoraConfig.from_pretrained(str(path))
                return raw, config, load_file(str(weights))
            except Exception as exc:
                raise ApiError(400, f"lora_path `{lora_path}`: {exc}", "lora_path", "invalid_value") from exc

        raw, config, state = await asyncio.to_thread(read)
        if raw.get("peft_type", "LORA") != "LORA" or raw.get("use_dora") or raw.get("lora_bias") \
                or raw.get("modules_to_save"):
            raise ApiError(400, f"lora_path `{lora_path}`: only plain LoRA adapters are served (no DoRA, LoRA "
                                "bias or modules_to_save)", "lora_path", "invalid_value")
        async with self._lock:
            if (tenant, lora_name) in self._loaded:
                raise ApiError(400, f"lora_name `{lora_name}` is loaded already; unload it first", "lora_name",
                               "invalid_value")
            internal = f"loaded{next(self._ids)}"
            try:
                await self._add(internal, config, state)
            except ValueError as exc:
                raise ApiError(400, f"lora_path `{lora_path}` does not fit this model: {exc}", "lora_path",
                               "invalid_value") from exc
            self._loaded[(tenant, lora_name)] = _Loaded(internal, str(Path(lora_path).resolve()))

    async def unload(self, lora_name: str, tenant: Tenant = None) -> None:
        """``POST /v1/unload_lora_adapter``: requests still on it end (reason "abort")."""
        async with self._lock:
            loaded = self._loaded.pop((tenant, lora_name), None)
            if loaded is None:
                raise ApiError(404, f"lora_name `{lora_name}` is not loaded", "lora_name", "model_not_found")
            engine = self.engine
            for rid, seq in list(engine.core.sequences.items()):
                if seq.options.adapter == loaded.internal:
                    engine.abort(rid)
            await engine.run_on_worker(lambda: self._delete(loaded.internal))

    async def _add(self, internal: str, config, state) -> None:
        from trainer.adapters import add_adapter

        model = self.engine.training.executor.model

        def add() -> None:
            add_adapter(model, internal, config, state)
            self.engine.worker.runner.adapters_changed()

        await self.engine.run_on_worker(add)

    def _delete(self, internal: str) -> None:
        from trainer.adapters import delete_adapter

        delete_adapter(self.engine.training.executor.model, internal)
        self.engine.worker.runner.adapters_changed()

    # -- listing ---------------------------------------------------------------------------------

    def listing(self, tenant: Tenant = None) -> list[tuple[str, str, str | None]]:
        """(id, root, parent) of every model a tenant's request may name, vLLM's way: the
        served model, its base, each pinnable version, each adapter it loaded."""
        served = self.served_name
        rows = [(served, served, None), (served + BASE_SUFFIX, served, served)]
        rows += [(f"{served}@{v}", f"{served}@{v}", served) for v in self.versions(tenant)]
        rows += [(name, loaded.path, served) for (owner, name), loaded in self._loaded.items() if owner == tenant]
        return rows
