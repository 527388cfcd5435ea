"""WaDi distillation core: VSD / DMD2 with LoRaD student and fake score on one frozen base."""

from wadi_core.vsd.config import PRESET_TARGETS, AdapterSpec, DMD2Config, VSDConfig
from wadi_core.vsd.distiller import Role, WaDiDistiller
from wadi_core.vsd.draws import Draws, GeneratorDraws, KeyedDraws
from wadi_core.vsd.losses import (add_noise, cfg_combine, dmd2_gradient, fake_score_loss, generator_loss,
                                  vsd_gradient, x0_from_eps)
from wadi_core.vsd.state import TrainState, capture_train_state, restore_train_state
from wadi_core.vsd.step import (NonFiniteGuard, NonFiniteTraining, StepResult, TorchUpdater, Updater, make_updaters,
                                vsd_step)

__all__ = [
    "AdapterSpec", "DMD2Config", "VSDConfig", "PRESET_TARGETS", "Role", "WaDiDistiller",
    "add_noise", "cfg_combine", "dmd2_gradient", "fake_score_loss", "generator_loss", "vsd_gradient",
    "x0_from_eps", "TrainState", "capture_train_state", "restore_train_state", "StepResult", "TorchUpdater", "Updater",
    "vsd_step", "make_updaters", "NonFiniteGuard", "NonFiniteTraining", "Draws", "GeneratorDraws", "KeyedDraws",
]

