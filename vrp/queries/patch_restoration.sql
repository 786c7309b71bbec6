-- Activation patching: mean restoration of the truth margin per model, site and layer (the causal-tracing heatmap)
-- restoration = (patched - recipient) / (donor - recipient) truth margin, per recipient; 1 means
-- the donor's margin was restored. fixed = share of wrongly answered recipients now answered right.
SELECT p.model,
       regexp_extract(p.setting, 'site=([a-z_]+)', 1) AS site,
       CAST(p.level AS INTEGER) AS layer,
       avg(p.restoration) AS mean_restoration,
       count(p.restoration) AS n,
       regexp_extract(p.setting, 'positions=([a-z]+)', 1) AS positions,
       regexp_extract(p.setting, 'pairs=([^,]+)', 1) AS pairs,
       avg(CASE WHEN coalesce(p.correct, false) THEN 1.0 ELSE 0.0 END) AS fixed
FROM interventions AS p
WHERE p.kind = 'patch' AND p.condition = 'patch'
GROUP BY ALL
ORDER BY p.model, site, layer, positions, pairs
