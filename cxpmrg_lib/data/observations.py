"""The 14 CheXpert observations, shared by the data layer, the labeller and the metrics.

Kept in a module of its own so that `data` does not depend on `labeler` (ARCHITECTURE.md layers).
"""

CHEXPERT_LABELS = [
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
    "No Finding",
]

# The five observations ViLMedic/RadEval report "top-5" CE scores on.
TOP5_LABELS = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]

# Label values used everywhere (CheXpert/CheXbert convention); NaN = not mentioned.
POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0
