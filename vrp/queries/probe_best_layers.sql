-- Best held-out probe per model, run, site and probe kind (out-of-fold AUROC with its bootstrap CI)
SELECT model, run_id, site, probe, layer, auroc, auroc_low, auroc_high, n, folds
FROM probe_layers
QUALIFY row_number() OVER (PARTITION BY model, run_id, site, probe ORDER BY auroc DESC, layer) = 1
ORDER BY model, run_id, site, probe
