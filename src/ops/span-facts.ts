/**
 * What the server span of a request says (SPEC §18, OpenTelemetry's HTTP semantic conventions),
 * decided once here and written by either encoding: protobuf bytes (otlp-protobuf.ts) or the
 * span objects OpenTelemetry's JSON exporter serialises (tracing.ts).
 */
import { CLIENT_CLOSED, pathOnly, type RequestContext } from '../proxy/context.js'
import { httpRoute, errorType, hostAddress, hostPort, requestHost, userAgent, requestMethod } from '../proxy/trace.js'

/** Receives a span's attributes, in order. */
export interface SpanWriter {
  string: (key: string, value: string) => void
  int: (key: string, value: number) => void
}

/** `{method} {target}`: the route's template, else its name; `HTTP` for a method OpenTelemetry does not know. */
export function spanName (ctx: RequestContext): string {
  const method = requestMethod(ctx.req.method as string)
  const verb = method === '_OTHER' ? 'HTTP' : method
  const route = ctx.route
  const target = httpRoute(route) ?? route?.name
  return target === undefined ? verb : `${verb} ${target}`
}

/** The server span's attributes. */
export function writeSpanAttributes (ctx: RequestContext, out: SpanWriter): void {
  const route = ctx.route
  const method = requestMethod(ctx.req.method as string)
  const host = requestHost(ctx)
  const scheme = (ctx.clientSocket as { encrypted?: boolean }).encrypted === true ? 'https' : 'http'
  out.string('http.request.method', method)
  out.string('url.path', pathOnly(ctx.path))
  // Conditionally required when the request had one (HTTP semantic conventions).
  const q = ctx.path.indexOf('?')
  if (q !== -1) out.string('url.query', redactedQuery(ctx.path.slice(q + 1)))
  out.string('url.scheme', scheme)
  out.string('network.protocol.version', ctx.req.httpVersion)
  out.string('breakwater.outcome', ctx.cause ?? 'client')
  const address = hostAddress(host)
  if (address !== undefined) {
    out.string('server.address', address)
    out.int('server.port', hostPort(host, scheme))
  }
  if (method === '_OTHER') out.string('http.request.method_original', ctx.req.method as string)
  // A client that left before any response got no status code.
  if (ctx.status !== CLIENT_CLOSED) out.int('http.response.status_code', ctx.status)
  const template = httpRoute(route)
  if (template !== null) out.string('http.route', template)
  const client = ctx.clientAddress
  if (client !== undefined) out.string('client.address', client)
  // Behind a trusted proxy, the proxy is the peer and the client the one it forwards for.
  const peer = ctx.peer
  if (peer !== client && peer !== undefined) out.string('network.peer.address', peer)
  const agent = userAgent(ctx.req.rawHeaders)
  if (agent !== undefined) out.string('user_agent.original', agent)
  const error = errorType(ctx)
  if (error !== undefined) out.string('error.type', error)
  if (route !== null) {
    out.string('breakwater.route', route.name)
    out.string('breakwater.upstream', route.upstream.name)
  }
}

/**
 * Query keys whose values OpenTelemetry's semantic conventions say to redact by default
 * (`url.query`): signatures and access keys of pre-signed URLs, which would let whoever reads
 * the traces make the request again.
 */
const SENSITIVE_QUERY_KEYS = new Set(['AWSAccessKeyId', 'Signature', 'sig', 'X-Goog-Signature'])

/** `url.query`: the query as received, without `?`, the values of sensitive keys replaced by `REDACTED`. */
export function redactedQuery (query: string): string {
  if (!/AWSAccessKeyId=|Signature=|sig=/.test(query)) return query
  return query.split('&').map((pair) => {
    const eq = pair.indexOf('=')
    return eq !== -1 && SENSITIVE_QUERY_KEYS.has(pair.slice(0, eq)) ? `${pair.slice(0, eq)}=REDACTED` : pair
  }).join('&')
}
