/**
 * The normal form of a request path (SPEC §14), shared by the data plane, which normalises every
 * request's path before matching (proxy/path.ts says why and how), and by the config, which
 * writes a route's `path` and `pathPrefix` in the same form so that they can match at all.
 */

/** Returns the normalised `path?query`, or null when the target is not a valid origin-form path. */
export function normalisePath (target: string): string | null {
  if (target.charCodeAt(0) !== 47 /* / */ || target.includes('#')) return null
  const q = target.indexOf('?')
  const path = q === -1 ? target : target.slice(0, q)
  if (path.includes('\\')) return null
  // Fast path: nothing to normalise (the common case, and no allocation).
  if (!path.includes('%') && !path.includes('//') && !path.includes('/.')) return target
  const decoded = decodeUnreserved(path)
  if (decoded === null) return null
  const resolved = removeDotSegments(decoded.replace(/\/{2,}/g, '/'))
  return q === -1 ? resolved : resolved + target.slice(q)
}

const HEX = /^[0-9A-Fa-f]{2}$/

function decodeUnreserved (path: string): string | null {
  if (!path.includes('%')) return path
  let out = ''
  let last = 0
  for (let i = path.indexOf('%'); i !== -1; i = path.indexOf('%', i + 1)) {
    const hex = path.slice(i + 1, i + 3)
    if (!HEX.test(hex)) return null
    const byte = parseInt(hex, 16)
    out += path.slice(last, i)
    out += isUnreserved(byte) ? String.fromCharCode(byte) : `%${hex.toUpperCase()}`
    last = i + 3
  }
  return out + path.slice(last)
}

function isUnreserved (c: number): boolean {
  return (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || (c >= 0x30 && c <= 0x39) ||
    c === 0x2d || c === 0x2e || c === 0x5f || c === 0x7e
}

/** RFC 3986 §5.2.4: `.` and `..` segments resolved; a final one leaves its trailing slash. */
export function removeDotSegments (path: string): string {
  const segments = path.split('/')
  const out: string[] = []
  for (let i = 1; i < segments.length; i++) {
    const s = segments[i] as string
    const last = i === segments.length - 1
    if (s === '.') {
      if (last) out.push('')
    } else if (s === '..') {
      out.pop()
      if (last) out.push('')
    } else {
      out.push(s)
    }
  }
  return '/' + out.join('/')
}
