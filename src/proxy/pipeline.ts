/**
 * Life of a request — the data plane's stages in call order. A reader starts here.
 *
 *   admission     overload limits: requests in flight, event-loop delay   → 503 overloaded
 *   normalise     the path and head, once
 *   trace         W3C traceparent continued or started, our span id for the upstream (trace.ts)
 *   refuse what cannot be forwarded as sent: a major version other than HTTP/1, an invalid
 *                 encoding, more header fields than the listener allows, framing (two Host,
 *                 CL conflicts)                                            → 400 / 431
 *                 `OPTIONS *` asks about the server itself                 → 200, answered here
 *   match route   first match in the route table                            → 404 no_route
 *   kill switch   the route's flag is off                                   → 503 feature_disabled
 *   rate limit    the route's token bucket for this key is empty            → 429 rate_limited
 *                 (never for the verifier's own probe)
 *   fault         game-day fault injection, when the route configures it   → abortStatus / delay
 *   body          a small request body (≤ 64 KiB) is read whole before an upstream slot is
 *                 taken; one not whole within `idleTimeoutMs` → disconnected (slow_client)
 *   failover      the upstream is unavailable and has a failover: the request goes there
 *   circuit breaker (bulkhead)
 *                 the upstream's circuit is open                            → 503 circuit_open
 *                 too many requests in flight to the upstream               → 503 bulkhead_full
 *   forward       endpoint choice, undici dispatch, streaming both ways     → 502 / 504
 *                 (a request undici will not send as it is                  → 400 bad_request)
 *                 a good 200 to a GET is teed into the route's fallback cache, when it has one
 *   fallback      instead of 503 feature_disabled / circuit_open / bulkhead_full, 502, 504:
 *                 the route's last good 200 (stale) or its static response (context.ts `refuse`)
 *   accounting    one cause per request: ok, upstream, client, breakwater (context.ts) →
 *                 breaker, passive ejection, route stats, trigger window, span, access-log line
 *                 (a fallback keeps the cause of what it replaced)
 *
 * Rate limit, failover and fallback cost one null check each on a route that does not
 * configure them.
 *
 * A WebSocket handshake (`Connection: upgrade`, `Upgrade: websocket`) runs the same stages —
 * one path, not a copy: its context is a `Tunnel` (upgrade.ts), which forwards the handshake
 * and splices the two sockets once the upstream answers 101.
 *
 * Admission creates the request's one context (an `Exchange` or a `Tunnel`); each stage fills
 * it in and either hands it on or answers with a code from `errors.ts` (`refuse`). The stages
 * read plain fields of objects built when the config loaded; nothing here awaits.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { Duplex } from 'node:stream'
import type { DataPlane } from './dataplane.js'
import { hostKey, requestHostKey, type Route } from './route-table.js'
import type { RequestContext } from './context.js'
import { absoluteForm, normalisePath } from './path.js'
import { isOwnProbe, requestHead, type RequestHead } from './headers.js'
import { beginTrace, incomingTraceparent, type Tracing } from './trace.js'
import { Exchange } from './forward.js'
import { Tunnel } from './upgrade.js'
import { killSwitchAllows } from './kill-switch.js'
import { decideFault, ABORT, DELAY } from './fault.js'
import type { FaultConfig, Listener } from '../config/types.js'

export interface PipelineOptions {
  /** Listener scheme for x-forwarded-proto. */
  proto: string
  /** Which listener this pipeline serves: only its routes can match (SPEC §15). */
  listener: Listener
  /**
   * Header fields (name and value each) a request may carry. Node keeps the first
   * `maxHeadersCount` fields and drops the rest without a word; the server asks it for one more
   * than the limit, so a request past it is seen and refused whole (431, nothing forwarded).
   */
  maxHeaderFields: number
  /** The sidecar's tracing (its exporter is null when tracing is off). */
  tracing: Tracing
}

/**
 * The `request` listener of a proxy server.
 *
 * A request pipelined behind one still being answered on the same connection (Node parses and
 * hands over both at once, and queues the second's response without a socket) waits for its
 * turn: that response may end the connection (`Connection: close` while draining, an HTTP/1.0
 * answer without a length), and what follows it on the wire is then not a request (RFC 9112
 * §9.6). Forwarded at once, it would run on the app while its answer had nowhere to go, and a
 * client that sends it again would run a POST twice. Node gives the response its socket when
 * the one before has ended and the connection lives on; if it does not live on, the request
 * is never started (nothing forwarded, nothing counted).
 */
export function createPipeline (dp: DataPlane, options: PipelineOptions): (req: IncomingMessage, res: ServerResponse) => void {
  return function handleRequest (req: IncomingMessage, res: ServerResponse): void {
    if (res.socket === null) {
      res.once('socket', () => { run(new Exchange(dp, req, res), options) })
      return
    }
    run(new Exchange(dp, req, res), options)
  }
}

/**
 * The `upgrade` listener of a proxy server: the same stages, with a `Tunnel` as the context.
 *
 * Node emits it as soon as it parses the handshake, even pipelined behind requests whose
 * answers are still being written to the same socket: tunnelled at once, the 101 would cut
 * into those answers. It waits for them as a pipelined request does (`createPipeline`), and is
 * never started when the last of them ends the connection.
 */
export function handleUpgrade (dp: DataPlane, req: IncomingMessage, socket: Duplex, head: Buffer, options: PipelineOptions): void {
  if (answering(socket) !== null) { afterAnswers(socket, () => { run(new Tunnel(dp, req, socket, head), options) }); return }
  run(new Tunnel(dp, req, socket, head), options)
}

/** The response Node is writing to a connection now (the first of those pipelined), or null. */
function answering (socket: Duplex): ServerResponse | null {
  return (socket as { _httpMessage?: ServerResponse | null })._httpMessage ?? null
}

/** Call `then` once no answer is being written to `socket`, unless one of them ended it. */
function afterAnswers (socket: Duplex, then: () => void): void {
  // Node took its listeners off the socket for the upgrade: an error meanwhile is only a close.
  socket.on('error', noop)
  const wait = (res: ServerResponse): void => {
    // 'close' comes once Node has handed the socket to the next answer, or ended it.
    res.once('close', () => {
      if (socket.destroyed || socket.writableEnded) { socket.destroy(); return }
      const next = answering(socket)
      if (next !== null) { wait(next); return }
      socket.off('error', noop)
      then()
    })
  }
  wait(answering(socket) as ServerResponse)
}

function noop (): void {}

/**
 * The bare forwarding core, for benchmarks only (`BREAKWATER_BENCH_BARE=1`): the same
 * header handling and forward stage, with every other stage switched off and the first route
 * taken for every request. It measures what the stages cost; it is not a mode to run.
 */
export function createBarePipeline (dp: DataPlane, options: PipelineOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const proto = options.proto
  return function handleRequest (req: IncomingMessage, res: ServerResponse): void {
    const exchange = new Exchange(dp, req, res)
    const head = exchange.head = requestHead(req.rawHeaders, req.socket.remoteAddress ?? '', proto, dp.newRequestId)
    beginTrace(exchange, options.tracing, head.traceparent, head.headers, head.traceparentAt, head.tracestate)
    exchange.route = dp.runtime.routes.routes[0] as Route
    exchange.upstream = exchange.route.upstream
    exchange.start()
  }
}

/** Requests whose `Expect` is not 100-continue (Node's 'checkExpectation'): refused as unforwardable. */
export const unmetExpectation = new WeakSet<IncomingMessage>()

/**
 * HTTP/1.1 requests with `Expect: 100-continue` (Node's 'checkContinue'): told `100 Continue`
 * only at the forward stage, once every stage that may refuse has passed (route, kill switch,
 * rate limit, fault, circuit breaker, bulkhead). A refusal is the final answer, never an
 * invitation to send the body.
 */
export const awaitingContinue = new WeakSet<IncomingMessage>()

/** Whether a raw header list has a Host field (an empty one counts: RFC 9112 §3.2). */
function hasHost (raw: readonly string[]): boolean {
  for (let i = 0; i < raw.length; i += 2) if ((raw[i] as string).toLowerCase() === 'host') return true
  return false
}

/** Admission to the fault stage. */
function run (ctx: RequestContext, { proto, listener, maxHeaderFields, tracing }: PipelineOptions): void {
  const dp = ctx.dp
  const req = ctx.req
  ctx.listener = listener

  // admission
  if ((dp.maxInFlight > 0 && dp.stats.inFlight >= dp.maxInFlight) || dp.overload.shedding) {
    if (dp.overload.shedding) dp.stats.overloaded.event_loop_delay++
    else dp.stats.overloaded.max_in_flight++
    beginTrace(ctx, tracing, incomingTraceparent(ctx), null, -1) // its span and log line, no upstream to tell
    ctx.refuse('overloaded')
    return
  }

  // normalise
  let target = ctx.path
  // RFC 9112 §3.2.2: a server MUST accept the absolute-form; it is routed and forwarded in
  // origin-form, and only when its authority is the Host the client sent (below): routes, kill
  // switches and the app all read Host, and a disagreement is refused, never guessed.
  let absolute: ReturnType<typeof absoluteForm> = null
  if (target.charCodeAt(0) !== 47 /* / */) {
    absolute = absoluteForm(target)
    if (absolute !== null) target = absolute.target
  }
  const path = normalisePath(target)
  const head = ctx.head = requestHead(req.rawHeaders, req.socket.remoteAddress ?? '', proto, dp.newRequestId)

  // trace
  beginTrace(ctx, tracing, head.traceparent, head.headers, head.traceparentAt, head.tracestate)

  // RFC 9110 §2.5: a major version other than 1 is not HTTP/1, whatever its line looks like.
  // Node's parser takes `HTTP/2.0` and `HTTP/0.9` request lines (and refuses other versions
  // itself); forwarded, they would reach the upstream as HTTP/1.1. Refused like any request
  // that cannot be forwarded as sent (SPEC §3, §15) rather than 505.
  if (req.httpVersionMajor !== 1) {
    refuseUnforwardable(ctx, 'bad_request', `HTTP/${req.httpVersion} on an HTTP/1 connection: only HTTP/1.0 and HTTP/1.1 are forwarded`)
    return
  }
  if (req.rawHeaders.length > maxHeaderFields) {
    refuseUnforwardable(ctx, 'headers_too_large', `more than ${maxHeaderFields / 2} header fields`)
    return
  }
  // RFC 9110 §9.3.7: `OPTIONS *` (asterisk-form, RFC 9112 §3.2.4) asks about the server itself;
  // so does `OPTIONS http://host:port`, with neither path nor query, which a proxy passes on as
  // `OPTIONS *` (RFC 9112 §3.2.4). `OPTIONS http://host:port/` asks about `/`.
  const asterisk = req.method === 'OPTIONS' && (target === '*' || absolute?.empty === true)
  if (path === null && !asterisk) {
    ctx.refuse('bad_request', 'invalid request target or percent-encoding')
    return
  }
  if (head.invalid !== null) {
    refuseUnforwardable(ctx, 'bad_request', head.invalid)
    return
  }
  if (head.host === '' && req.httpVersionMinor === 1 && !hasHost(req.rawHeaders)) {
    refuseUnforwardable(ctx, 'bad_request', 'an HTTP/1.1 request needs a Host header')
    return
  }
  if (absolute !== null && !sameAuthority(absolute.authority, head, absolute.defaultPort)) {
    refuseUnforwardable(ctx, 'bad_request', `the target's authority (${absolute.authority}) is not the Host header (${head.host})`)
    return
  }
  if (unmetExpectation.has(req)) {
    refuseUnforwardable(ctx, 'bad_request', 'Expect: only 100-continue is supported')
    return
  }
  if (asterisk || path === null) {
    // Answered here, like a ping: it names no resource, so no route, and undici sends only
    // origin- and absolute-form targets, so it cannot be passed on as it is.
    if (ctx instanceof Exchange) ctx.answerServerOptions()
    else ctx.refuse('bad_request', 'only WebSocket upgrades (GET) are supported')
    return
  }
  ctx.path = path
  // Only WebSocket upgrades are tunnelled; h2c and the like are out of scope (SPEC §14).
  if (ctx.upgrade && (!head.isWebSocket || req.method !== 'GET')) {
    ctx.refuse('bad_request', 'only WebSocket upgrades (GET) are supported')
    return
  }

  // match route
  const route = ctx.route = dp.runtime.routes.match(req.method as string, path, head, req, listener)
  if (route === null) {
    ctx.refuse('no_route')
    return
  }
  ctx.upstream = route.upstream

  // kill switch
  if (!killSwitchAllows(dp.flags, route, req.method as string, path, head)) {
    route.stats.reject('kill_switch')
    ctx.refuse('feature_disabled')
    return
  }

  // rate limit — not for the verifier's own probe: it would measure the limit (a 429 failing
  // verification) and take a user's token; verification skips a route the limit sheds.
  const limiter = route.rateLimiter
  if (limiter !== null && !isOwnProbe(head, dp.probeKey)) {
    const waitSeconds = limiter.take(req, performance.now())
    if (waitSeconds !== 0) {
      route.stats.reject('rate_limit')
      ctx.refuse('rate_limited', undefined, limiter.refusalHeaders(waitSeconds))
      return
    }
  }

  // fault
  const fault = decideFault(route.config.fault, dp.flags)
  if (fault === ABORT) {
    route.stats.fault('abort')
    ctx.fault = 'abort'
    ctx.refuse('fault_injected', undefined, ['x-breakwater-fault', 'abort'], (route.config.fault as FaultConfig).abortStatus)
    return
  }
  if (fault === DELAY) {
    route.stats.fault('delay')
    ctx.fault = 'delay'
    // Marks every answer to the request, ours or the upstream's (a tunnel's 101 is the upstream's alone).
    if (ctx instanceof Exchange) ctx.res.setHeader('x-breakwater-fault', 'delay')
    setTimeout(guardAndForward, (route.config.fault as FaultConfig).delayMs, ctx)
    return
  }

  guardAndForward(ctx)
}

/** The body, failover and circuit breaker (bulkhead) stages, then forward. */
function guardAndForward (ctx: RequestContext): void {
  if (ctx.clientGone) { ctx.clientLeft(); return } // during an injected delay
  // A body the client waits to be invited to send is not read first: it is invited at the
  // forward stage, once no stage refuses (a refusal goes out with no `100 Continue` before it).
  const invite = (ctx.head as RequestHead).expects && ctx instanceof Exchange && awaitingContinue.has(ctx.req)
  // body: a small one is read whole first (forward.ts), then this stage runs again
  if (!invite && ctx instanceof Exchange && ctx.readBodyFirst(guardAndForward)) return
  const route = ctx.route as Route
  let upstream = route.upstream

  // failover
  if (upstream.failover !== null) {
    upstream = ctx.upstream = upstream.failover.choose(upstream, performance.now())
    // Marks every answer to the request, ours or the failover upstream's.
    if (upstream !== route.upstream && ctx instanceof Exchange) ctx.res.setHeader('x-breakwater-failover', upstream.name)
  }

  // circuit breaker (bulkhead)
  const circuit = upstream.circuit
  if (circuit !== null) {
    if (!circuit.admits()) {
      route.stats.reject('circuit_open')
      // Users saw an outage when failures opened it (SPEC §14); an operator's forced circuit is a mitigation.
      ctx.outage = circuit.openOnFailures
      ctx.refuse('circuit_open', undefined, ['retry-after', String(circuit.retryAfterSeconds(Date.now()))])
      return
    }
    const max = circuit.config.maxConcurrentRequests
    if (max > 0 && upstream.inFlight >= max) {
      route.stats.reject('bulkhead')
      ctx.refuse('bulkhead_full')
      return
    }
    ctx.pass = circuit.enter()
  }

  // forward
  if (invite && awaitingContinue.delete(ctx.req)) (ctx as Exchange).res.writeContinue()
  ctx.start()
}

/**
 * An absolute-form target's authority and the Host header name the same origin (RFC 9110
 * §4.2.3): as routes read a host (any case, a final dot or not), the scheme's default port
 * written or not — `http://shop:80/x` with `Host: shop` is one origin.
 */
function sameAuthority (authority: string, head: RequestHead, defaultPort: string): boolean {
  const key = (k: string): string => k.endsWith(defaultPort) ? k.slice(0, -defaultPort.length) : k
  return key(hostKey(authority)) === key(requestHostKey(head))
}

/**
 * A request that cannot be forwarded as sent (SPEC §15): a 4xx before any upstream contact,
 * counted as a client error (`refuse`), and the connection closed — its framing cannot be trusted.
 */
function refuseUnforwardable (ctx: RequestContext, code: 'bad_request' | 'headers_too_large', why: string): void {
  if (ctx instanceof Exchange) ctx.res.shouldKeepAlive = false
  ctx.refuse(code, why)
}
