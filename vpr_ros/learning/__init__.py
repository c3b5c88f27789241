"""Learning: training place-recognition models and fine-tuning them after pruning.

The subpackage owns

* ``data``: place-labelled images in the VPR folder format (``@east@north@`` file names),
  the train/val splits and their positives (``ground_truth.positives_within_radius``);
* ``losses``: SelaVPR's triplet + mutual-nearest-neighbour local loss, the multi-similarity
  loss and relational distillation;
* ``train``: SelaVPR training (hard-negative mining, epochs, validation through the shipped
  ``Relocalizer``, checkpoints and resume) and its settings ``TrainConf``;
* ``finetune``: the optimisation step both training and fine-tuning run, the fine-tuning
  loop that recovers a pruned model (``Finetuner``, ``FinetuneConf``) and batch-norm
  re-estimation (``BatchNormCalibrator``).

Importing ``data``, ``train`` or ``finetune`` does not import torch (their settings tables
build the command-line flags, and ``--help`` must be instant); ``losses`` does.
"""
