/**
 * Path normalisation before matching (SPEC §14), so that a kill switch on `/checkout` cannot be
 * bypassed by spelling it `/checkou%74`, `//checkout` or `/x/../checkout`:
 * - percent-encoded unreserved characters are decoded (RFC 3986 §6.2.2.2), other escapes are
 *   upper-cased; `%2F` stays encoded (it is data, not a separator);
 * - runs of `/` collapse to one;
 * - `.` and `..` segments are resolved (RFC 3986 §5.2.4).
 * The query is left as it is. The normalised path is what is forwarded.
 *
 * Two characters are refused (400) rather than normalised, as Envoy and HAProxy refuse them:
 * - `#` anywhere: a fragment is never part of a request-target (RFC 9112 §3.2, RFC 3986 §3.5;
 *   Envoy rejects it since 1.19.1, HAProxy since CVE-2023-45539). Matching the whole target
 *   while the app drops the fragment is how `/pay#x` missed `path: /pay` and reached the
 *   killed handler through a catch-all route.
 * - `\` in the path: not a `pchar` (RFC 3986 §3.3), and WHATWG-URL-based routers
 *   (`new URL()`) read it as `/`, so `/x\..\checkout` is `/checkout` to the app but not to a
 *   matcher that follows the RFC. HAProxy refuses it in a URI by default. Browsers never send
 *   it (they rewrite it to `/` first), so refusing costs no legitimate client.
 *
 * `matchKey` then folds what the app may treat as the same path (SPEC §15) for route matching
 * only; what is forwarded keeps the client's spelling. `%2F` stays data for routing too, but a
 * kill switch also guards the spelling with it read as `/` (`slashAlias`).
 */
import { normalisePath, removeDotSegments } from '../config/request-path.js'

/**
 * RFC 9112 §3.2.2: a request target in absolute-form (`http://host:port/path?query`), as its
 * authority, its origin-form (`/path?query`, `/` when it has no path) and its scheme's default
 * port (`:80`, `:443`), and whether it has neither path nor query (`http://host:port`: for
 * `OPTIONS`, the server itself, RFC 9112 §3.2.4); null when `target` is not one (or carries
 * userinfo, which RFC 9110 §4.2.4 forbids in http(s) URIs).
 */
export function absoluteForm (target: string): { authority: string, target: string, defaultPort: string, empty: boolean } | null {
  const m = /^http(s?):\/\/([^/?#]*)(.*)$/i.exec(target)
  if (m === null) return null
  const authority = m[2] as string
  const rest = m[3] as string
  if (authority === '' || authority.includes('@')) return null
  return { authority, target: rest === '' || rest.charCodeAt(0) === 63 /* ? */ ? `/${rest}` : rest, defaultPort: m[1] === '' ? ':80' : ':443', empty: rest === '' }
}

export { normalisePath }

/**
 * The key a non-strict route matches on (SPEC §15): the normalised path without its query,
 * `;` segment parameters removed (see `withoutSegmentParameters`), ASCII letters lower-cased
 * (case-insensitive app routers), and one trailing slash dropped (`/pay/`). The root stays `/`.
 */
export function matchKey (normalised: string): string {
  const q = normalised.indexOf('?')
  let key = q === -1 ? normalised : normalised.slice(0, q)
  if (key.includes(';')) key = withoutSegmentParameters(key)
  key = foldCase(key)
  return key.length > 1 && key.charCodeAt(key.length - 1) === 47 /* / */ ? key.slice(0, -1) : key
}

/**
 * A match key with its encoded slashes read as separators (`/checkout%2fcart` is
 * `/checkout/cart`), or null when it has none: what an app that decodes the path before
 * routing sees (WSGI's `PATH_INFO`, Go's `URL.Path`). Routing keeps `%2F` as data, as Envoy's
 * default does; a killed route also claims this spelling (route-table.ts), so an encoded slash
 * is no way round its kill switch.
 */
export function slashAlias (key: string): string | null {
  if (!key.includes('%2f')) return null
  const path = removeDotSegments(key.replaceAll('%2f', '/').replace(/\/{2,}/g, '/'))
  return path.length > 1 && path.charCodeAt(path.length - 1) === 47 /* / */ ? path.slice(0, -1) : path
}

/**
 * A normalised path (no query) with its `;` segment parameters removed (`/pay;jsessionid=1`):
 * servlet containers and Spring strip them before routing and then resolve `/x/..;/pay` to
 * `/pay`, so slashes are collapsed and dot segments resolved again afterwards.
 */
export function withoutSegmentParameters (path: string): string {
  return removeDotSegments(path.replace(/;[^/]*/g, '').replace(/\/{2,}/g, '/'))
}

/** ASCII letters lower-cased; other characters untouched (no Unicode case folding). */
export function foldCase (s: string): string {
  return ASCII_UPPER.test(s) ? s.replace(ASCII_UPPER_RUN, lower) : s
}

const ASCII_UPPER = /[A-Z]/
const ASCII_UPPER_RUN = /[A-Z]+/g
const lower = (s: string): string => s.toLowerCase()
