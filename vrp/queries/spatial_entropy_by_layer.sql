-- Mean spatial entropy H_s of the answer position's attention map per layer and its change from the previous layer, per model
-- A sharp negative delta early on is the paper's "early locking"; entropy_norm is H_s / ln(N). Image runs only.
WITH per_layer AS (
    SELECT l.model, l.layer,
           count(*) AS n,
           avg(l.spatial_entropy) AS spatial_entropy,
           avg(l.spatial_entropy_norm) AS spatial_entropy_norm,
           avg(l.image_mass) AS image_mass
    FROM layers AS l
    LEFT JOIN runs AS r USING (run_id)
    WHERE r.base_run_id IS NULL
    GROUP BY ALL
)
SELECT model, layer, n, spatial_entropy,
       spatial_entropy - lag(spatial_entropy) OVER (PARTITION BY model ORDER BY layer) AS delta,
       spatial_entropy_norm, image_mass
FROM per_layer
ORDER BY model, layer
