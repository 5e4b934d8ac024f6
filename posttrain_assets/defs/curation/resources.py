"""The curation resources: the embedding model and the mixture specs (``POSTTRAIN_MIXTURES``)."""

from __future__ import annotations

import os

import dagster as dg
from pydantic import PrivateAttr

from posttrain_assets.settings import MIXTURES, OPT_IN_DEFAULTS


class EmbedderResource(dg.ConfigurableResource):
    """The bundled embedding model (the ``curation`` extra), loaded once per process when a curation asset runs."""

    _embedder: object = PrivateAttr(default=None)

    def get(self):  # -> posttrain_assets.curation.embedder.Embedder
        if self._embedder is None:
            from posttrain_assets.curation.embedder import load_embedder

            self._embedder = load_embedder()
        return self._embedder


class MixtureSpecsResource(dg.ConfigurableResource):
    """Mixture spec files, separated by ``os.pathsep`` (empty: no mixture is built)."""

    paths: str = ""

    def files(self) -> list[str]:
        return [p for p in self.paths.split(os.pathsep) if p.strip()]


@dg.definitions
def resources() -> dg.Definitions:
    mixtures = dg.EnvVar(MIXTURES) if os.environ.get(MIXTURES) else OPT_IN_DEFAULTS[MIXTURES]
    return dg.Definitions(
        resources={"embedder": EmbedderResource(), "mixture_specs": MixtureSpecsResource(paths=mixtures)}
    )
