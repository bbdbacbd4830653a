"""selm_train: a thin DeepSpeed trainer for DPO, IPO and SELM on selm snapshots."""
