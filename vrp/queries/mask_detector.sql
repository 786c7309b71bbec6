-- Masking as a per-sample detector: change in first-token entropy and truth margin when the most attended patches are greyed (high minus full)
-- One row per mask run and sample. A large entropy rise or truth-margin drop means the answer
-- leaned on the patches the model attended to most; the correlation table carries both deltas
-- (averaged over a sample's mask runs) as reliability signals.
SELECT f.model, f.run_id, f.base_run_id, f.sample_id, f.setting,
       h.token_entropy - f.token_entropy AS mask_entropy_delta,
       h.truth_margin - f.truth_margin AS mask_truth_margin_delta,
       f.correct AS correct_full,
       h.correct AS correct_high
FROM interventions AS f
JOIN interventions AS h
  ON h.run_id = f.run_id AND h.sample_id = f.sample_id AND h.condition = 'high'
WHERE f.kind = 'mask' AND f.condition = 'full'
ORDER BY f.model, f.run_id, f.sample_id
