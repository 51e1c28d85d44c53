/**
 * Life of a request — the data plane's stages in call order. A reader starts here.
 *
 *   admission     overload limits: requests in flight, event-loop delay   → 503 overloaded
 *   normalise     the path and head, once; an invalid encoding, or framing
 *                 that cannot be forwarded as sent (two Host, CL conflicts) → 400 bad_request
 *   match route   first match in the route table                            → 404 no_route
 *   kill switch   the route's flag is off                                   → 503 feature_disabled
 *   fault         game-day fault injection, when the route configures it   → abortStatus / delay
 *   circuit breaker (bulkhead)
 *                 the upstream's circuit is open                            → 503 circuit_open
 *                 too many requests in flight to the upstream               → 503 bulkhead_full
 *   forward       endpoint choice, undici dispatch, streaming both ways     → 502 / 504
 *
 * Each stage either hands the request on or answers it with a code from `errors.ts`. The
 * stages read plain fields of objects built when the config loaded; nothing here awaits.
 */
import type { IncomingMessage, ServerResponse } from 'node:http'
import type { DataPlane } from './dataplane.js'
import type { Route } from './route-table.js'
import { normalisePath } from './path.js'
import { requestHead } from './headers.js'
import { Exchange } from './forward.js'
import { killSwitchAllows } from './kill-switch.js'
import { decideFault, ABORT, DELAY } from './fault.js'
import type { RequestHead } from './headers.js'
import type { FaultConfig } from '../config/types.js'
import { ERRORS, sendError, type ErrorCode } from './errors.js'

export interface PipelineOptions {
  /** Listener scheme for x-forwarded-proto. */
  proto: string
}

/** The `request` listener of a proxy server. */
export function createPipeline (dp: DataPlane, options: PipelineOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const proto = options.proto
  return function handleRequest (req: IncomingMessage, res: ServerResponse): void {
    const startedAt = performance.now()

    // admission
    if ((dp.maxInFlight > 0 && dp.stats.inFlight >= dp.maxInFlight) || dp.overload.shedding) {
      if (dp.overload.shedding) dp.stats.overloaded.event_loop_delay++
      else dp.stats.overloaded.max_in_flight++
      refuse(dp, req, res, 'overloaded', null, dp.newRequestId(), startedAt)
      return
    }

    // normalise
    const path = normalisePath(req.url as string)
    const head = requestHead(req.rawHeaders, req.socket.remoteAddress ?? '', proto, dp.newRequestId)
    if (path === null) {
      refuse(dp, req, res, 'bad_request', null, head.requestId, startedAt, 'invalid request target or percent-encoding')
      return
    }
    if (head.invalid !== null) {
      refuseUnforwardable(dp, req, res, 'bad_request', head.invalid, head.requestId, startedAt)
      return
    }

    // match route
    const route = dp.runtime.routes.match(req.method as string, path, head.host, req)
    if (route === null) {
      refuse(dp, req, res, 'no_route', null, head.requestId, startedAt)
      return
    }

    // kill switch
    if (!killSwitchAllows(dp.flags, route)) {
      route.stats.reject('kill_switch')
      refuse(dp, req, res, 'feature_disabled', route, head.requestId, startedAt)
      return
    }

    // fault
    const fault = decideFault(route.config.fault, dp.flags)
    if (fault === ABORT) {
      const cfg = route.config.fault as FaultConfig
      route.stats.fault('abort')
      route.stats.outcome(Date.now(), cfg.abortStatus >= 500, performance.now() - startedAt)
      refuse(dp, req, res, 'fault_injected', route, head.requestId, startedAt, undefined, ['x-breakwater-fault', 'abort'], cfg.abortStatus)
      return
    }
    if (fault === DELAY) {
      route.stats.fault('delay')
      res.setHeader('x-breakwater-fault', 'delay')
      setTimeout(guardAndForward, (route.config.fault as FaultConfig).delayMs, dp, route, req, res, head, path, startedAt, 'delay')
      return
    }

    guardAndForward(dp, route, req, res, head, path, startedAt, null)
  }
}

/**
 * The bare forwarding core, for benchmarks only (`BREAKWATER_BENCH_BARE=1`): the same
 * header handling and forward stage, with every other stage switched off and the first route
 * taken for every request. It measures what the stages cost; it is not a mode to run.
 */
export function createBarePipeline (dp: DataPlane, options: PipelineOptions): (req: IncomingMessage, res: ServerResponse) => void {
  const proto = options.proto
  return function handleRequest (req: IncomingMessage, res: ServerResponse): void {
    const startedAt = performance.now()
    const head = requestHead(req.rawHeaders, req.socket.remoteAddress ?? '', proto, dp.newRequestId)
    new Exchange(dp, dp.runtime.routes.routes[0] as Route, req, res, head, req.url as string, startedAt).start(null)
  }
}

/** The circuit breaker (bulkhead) stage, then forward. */
function guardAndForward (dp: DataPlane, route: Route, req: IncomingMessage, res: ServerResponse, head: RequestHead, path: string, startedAt: number, fault: 'delay' | null): void {
  if (res.destroyed) return // the client left during an injected delay

  // circuit breaker (bulkhead)
  const upstream = route.upstream
  const circuit = upstream.circuit
  if (circuit !== null) {
    if (!circuit.admits()) {
      route.stats.reject('circuit_open')
      // Users saw an outage when failures opened it (SPEC §14); an operator's forced circuit is a mitigation.
      if (circuit.openOnFailures) route.stats.outcome(Date.now(), true, -1)
      refuse(dp, req, res, 'circuit_open', route, head.requestId, startedAt, undefined, ['retry-after', String(circuit.retryAfterSeconds(Date.now()))])
      return
    }
    const max = circuit.config.maxConcurrentRequests
    if (max > 0 && upstream.inFlight >= max) {
      route.stats.reject('bulkhead')
      refuse(dp, req, res, 'bulkhead_full', route, head.requestId, startedAt)
      return
    }
  }

  // forward
  const exchange = new Exchange(dp, route, req, res, head, path, startedAt)
  exchange.fault = fault
  if (circuit === null) {
    exchange.start(null)
    return
  }
  circuit.fire(exchange)
  if (!exchange.started) {
    // opossum refused on its own (it changed state between our check and the call).
    route.stats.reject('circuit_open')
    refuse(dp, req, res, 'circuit_open', route, head.requestId, startedAt, undefined, ['retry-after', String(circuit.retryAfterSeconds(Date.now()))])
  }
}

/**
 * A request that cannot be forwarded as sent (SPEC §15): a 4xx before any upstream contact,
 * counted as a client error, and the connection closed — its framing cannot be trusted.
 */
export function refuseUnforwardable (dp: DataPlane, req: IncomingMessage, res: ServerResponse, code: 'bad_request' | 'headers_too_large', why: string, requestId: string, startedAt: number): void {
  dp.stats.clientError(code)
  res.shouldKeepAlive = false
  refuse(dp, req, res, code, null, requestId, startedAt, why)
}

/** Answer with a local error, count it and write its access-log line. */
export function refuse (dp: DataPlane, req: IncomingMessage, res: ServerResponse, code: ErrorCode, route: Route | null, requestId: string, startedAt: number, message?: string, extraHeaders?: string[], statusOverride?: number): void {
  // A request body we will not read must not stall the connection: close it after answering.
  const close = dp.draining || (req.headers['content-length'] !== undefined && req.headers['content-length'] !== '0') || req.headers['transfer-encoding'] !== undefined
  sendError(res, code, requestId, close, extraHeaders, message, statusOverride)
  const status = statusOverride ?? ERRORS[code].status
  const seconds = (performance.now() - startedAt) / 1000
  const stats = route === null ? dp.stats.route('', '') : route.stats
  stats.record(status, seconds)
  const rate = dp.accessLogRate
  if (rate > 0 && (rate >= 1 || Math.random() < rate)) {
    const url = req.url ?? ''
    const q = url.indexOf('?')
    dp.logger.info({
      requestId,
      method: req.method,
      path: q === -1 ? url : url.slice(0, q),
      route: route?.name,
      upstream: route?.upstream.name,
      status,
      durationMs: Math.round(seconds * 1e6) / 1e3,
      error: code
    }, 'request')
  }
}
