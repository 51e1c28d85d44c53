// Small statistics helpers over per-round values.

const finite = (xs) => xs.filter((x) => typeof x === 'number' && Number.isFinite(x))

export function median (xs) {
  const v = finite(xs).sort((a, b) => a - b)
  if (v.length === 0) return null
  const mid = v.length >> 1
  return v.length % 2 ? v[mid] : (v[mid - 1] + v[mid]) / 2
}

export function min (xs) {
  const v = finite(xs)
  return v.length ? Math.min(...v) : null
}

export function max (xs) {
  const v = finite(xs)
  return v.length ? Math.max(...v) : null
}

export function sum (xs) {
  return finite(xs).reduce((a, b) => a + b, 0)
}

/** (max - min) / median, in %. */
export function spreadPct (xs) {
  const m = median(xs)
  if (!m) return null
  return (100 * (max(xs) - min(xs))) / m
}
