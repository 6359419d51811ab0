"""Training for jaxmodels: a train state, pure step functions and the loop that runs them.

from train import create_train_state, train_step, eval_step
"""

from train.state import TrainState, create_train_state
from train.steps import eval_step, train_step

__all__ = ["TrainState", "create_train_state", "eval_step", "train_step"]
