"""Deterministic synthetic chest-radiograph phantoms with exact ground truth.

The demo models in the default model store are trained only on these images, and the
fast tests use them, so two properties matter more than photo-realism:

* **Exact truth.** Lung masks, the opacity mask, the per-lung opacified fraction and the
  scores derived from it are computed from the same geometry that is drawn, at the
  output resolution. ``geographic_extent`` is computed *from the achieved fraction*, so
  it always agrees with ``opacity_mask``.
* **Learnable, not trivial.** The cues a model needs (dark lungs with vessels and ribs,
  heart and mediastinum, domed diaphragms, ground-glass versus consolidation, extent)
  are drawn like a radiograph, with per-seed anatomy, pose, exposure, blur and noise.
  Film style (PA / portable AP / screenshot) is only weakly tied to the class, so a
  classifier has to look at the lungs.

How an image is made (kind ``"frontal"``): every pixel is mapped back into "body
coordinates" (x across, y down, the thorax spans about -1..1) through a per-image pose
(scale, shift, rotation). Each structure adds an X-ray attenuation ``A`` there (soft
tissue, spine, ribs, clavicles, heart, vessels, tubes) and the lungs remove some (air).
The film value is ``1 - exp(-A)`` put through a per-image window and gamma, then blurred
and given noise. Opacities replace a fraction of the lung air inside a region obtained by
thresholding a smooth random field restricted to one lung at the quantile that hits the
target fraction.

Randomness: each phantom uses ``np.random.default_rng([seed, stream])`` with separate
streams for anatomy, acquisition, opacity, survival and wording, and no global RNG. All
arithmetic on images is float64 (numpy / OpenCV) and all drawing is integer rasterised,
so the same spec gives the same bytes on any machine: a float64 rounding difference of
one ulp would have to land exactly on a .5 grey boundary to show.

Conventions: images are uint8, MONOCHROME2 (bone bright, air dark); the patient's
right lung is on the image LEFT (radiological convention).

Cost: about 20-30 ms per 384x384 frontal image on one core (smooth structures are
computed at half resolution and interpolated; masks are thresholded from the same
interpolated fields the image is drawn from, so they still match it exactly), so 1000
phantoms take well under a minute.

Survival model (documented so it can be tested): the probability of death is
``sigmoid(-4.0 + 0.30 * geographic_extent + 0.45 * opacity_score + 0.045 * (age - 60))``
(see :func:`death_probability`); ``survival`` is one Bernoulli draw from it.
"""
from cxrserve.synthetic.phantoms.dataset import write_dataset  # noqa: F401
from cxrserve.synthetic.phantoms.render import render, render_many  # noqa: F401
from cxrserve.synthetic.phantoms.spec import LABELS, KINDS, STYLES, CSV_COLUMNS, PhantomSpec, Phantom, extent_score, death_probability, sample_spec  # noqa: F401
