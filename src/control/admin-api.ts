/**
 * The admin API (SPEC §6) on `listen.admin`: JSON, `Authorization: Bearer TOKEN`, separate
 * from the proxy and ops listeners. Every mutation needs a `reason`, is applied at once,
 * persisted and audited before the answer — never after a rollback action or a notification,
 * which run in the background. Bad input is a 4xx with a message, never a 500.
 */
import Fastify, { type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify'
import type { Logger } from 'pino'
import { MAX_DURATION_MS, toMs } from '../config/duration.js'
import { authorized } from './token.js'
import { ControlError, type Actor, type ControlPlane } from './control-plane.js'
import { renderReport, type IncidentReport } from './report.js'
import { WITHOUT_SCHEMAS } from '../ops/fastify-options.js'

export interface AdminDeps {
  control: ControlPlane
  token: () => string
  /** GET /v1/state body. */
  state: () => Record<string, unknown>
  /** Re-read the config file, audited with `actor` as who asked. */
  reload: (actor: Actor) => Promise<{ ok: boolean, problems: readonly string[], draining?: boolean }>
  /** GET /v1/triage body. */
  triage: () => Record<string, unknown>
  /** GET /v1/incidents body. */
  incidents: () => unknown[]
  /** The post-mortem draft of an incident, or null for an unknown id. */
  report: (id: string) => Promise<IncidentReport | null>
  /** Where an unexpected error (a 500) is logged: never silent. */
  logger: Logger
}

const BODY_LIMIT = 16 * 1024
const DURATION = /^[0-9]+(\.[0-9]+)?(ms|s|m|h)$/

type Body = Record<string, unknown>

/**
 * The body of a call that takes `fields`. A field it does not take is refused, not ignored: a
 * misspelt `scope` would otherwise kill on this sidecar alone while the operator believes the
 * whole fleet is covered, and a misspelt `ttl` would make a kill that never lapses.
 */
function body (req: FastifyRequest, fields: readonly string[]): Body {
  const b = req.body
  if (b === undefined || b === null) return {}
  if (typeof b !== 'object' || Array.isArray(b)) throw new ControlError(400, 'bad_request', 'the body must be a JSON object')
  for (const key of Object.keys(b)) {
    if (fields.includes(key)) continue
    const near = fields.find((f) => close(f, key))
    throw new ControlError(400, 'bad_request', `unknown field "${key}"${near !== undefined ? ` (did you mean "${near}"?)` : ''}: this call takes ${fields.join(', ')}`)
  }
  return b as Body
}

/** Whether `typed` is `field` with a slip: another case, or at most two letters changed, added, dropped or swapped. */
function close (field: string, typed: string): boolean {
  const a = field.toLowerCase()
  const b = typed.toLowerCase()
  // The optimal string alignment distance, row by row (`prev` is row i - 1, `before` row i - 2).
  let before: number[] = []
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const row = [i]
    for (let j = 1; j <= b.length; j++) {
      let best = Math.min((prev[j] ?? 0) + 1, (row[j - 1] ?? 0) + 1, (prev[j - 1] ?? 0) + (a[i - 1] === b[j - 1] ? 0 : 1))
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) best = Math.min(best, (before[j - 2] ?? 0) + 1)
      row.push(best)
    }
    before = prev
    prev = row
  }
  return (prev[b.length] ?? 0) <= Math.min(2, Math.floor(a.length / 2))
}

function actor (req: FastifyRequest, b: Body, optionalReason?: string): Actor {
  const reason = b.reason ?? optionalReason
  if (typeof reason !== 'string' || reason.trim() === '') throw new ControlError(400, 'bad_request', 'reason is required: say why (it goes into the audit log)')
  if (reason.length > 1000) throw new ControlError(400, 'bad_request', 'reason: at most 1000 characters')
  return { reason: reason.trim(), requester: req.socket.remoteAddress ?? 'unknown', source: 'operator' }
}

/**
 * `ttl`: a duration as the config takes it, with the config's bound (`MAX_DURATION_MS`, about
 * 24.8 days). Past it, `1e300` or `"9999999999999s"` would be no expiry time at all (beyond what
 * a Date holds): refused here as bad input, never a 500 further on.
 */
function ttl (b: Body): number | null {
  const v = b.ttl
  if (v === undefined || v === null) return null
  const ms = typeof v === 'number' ? v : typeof v === 'string' && DURATION.test(v) ? toMs(v) : Number.NaN
  if (!Number.isInteger(ms) || ms <= 0) throw new ControlError(400, 'bad_request', 'ttl must be a positive duration (ms, or 30s, 10m, 1h)')
  if (ms > MAX_DURATION_MS) throw new ControlError(400, 'bad_request', `ttl must be at most ${MAX_DURATION_MS} ms (about 24.8 days; leave ttl out for no end) (got ${JSON.stringify(v)})`)
  return ms
}

/** `"scope": "fleet"` writes the override (or the failover) for every sidecar of the service (SPEC §16). */
function fleetScope (b: Body): boolean {
  const v = b.scope
  if (v === undefined || v === null || v === 'local') return false
  if (v === 'fleet') return true
  throw new ControlError(400, 'bad_request', 'scope must be "local" (this sidecar, the default) or "fleet" (every sidecar of the service)')
}

function stringList (b: Body, key: string): string[] | undefined {
  const v = b[key]
  if (v === undefined || v === null) return undefined
  if (!Array.isArray(v) || !v.every((x) => typeof x === 'string' && x !== '')) throw new ControlError(400, 'bad_request', `${key} must be a list of names`)
  return v as string[]
}

/**
 * What a mutating call asked for, as its audit line would have named it: a mitigation that
 * names nothing (a rollback, a bare kill switch or circuit break) is about what it would have
 * acted on.
 */
function wantedBy (req: FastifyRequest, b: Body, control: ControlPlane): { action: string, targets: string[] } {
  const p = req.params as Record<string, string | undefined>
  const names = (key: string): string[] => Array.isArray(b[key]) ? (b[key] as unknown[]).filter((x): x is string => typeof x === 'string') : []
  switch (`${req.method} ${req.routeOptions.url ?? ''}`) {
    case 'PUT /v1/flags/:key': return { action: 'flag.override', targets: [p.key ?? ''] }
    case 'DELETE /v1/flags/:key': return { action: 'flag.clear', targets: [p.key ?? ''] }
    case 'PUT /v1/circuits/:upstream': return { action: 'circuit.force', targets: [p.upstream ?? ''] }
    case 'POST /v1/mitigations': {
      const named = [...names('flags'), ...names('upstreams'), ...names('routes')]
      return { action: `mitigation.${String(b.action)}`, targets: named.length > 0 ? named : control.impliedTargets(String(b.action)) }
    }
    case 'DELETE /v1/mitigations/:id': return { action: 'mitigation.lift', targets: [p.id ?? ''] }
    default: return { action: `${req.method} ${req.url.split('?')[0] ?? ''}`, targets: [] }
  }
}

export function createAdminServer (deps: AdminDeps): FastifyInstance {
  const app = Fastify({
    logger: false,
    bodyLimit: BODY_LIMIT,
    forceCloseConnections: true,
    return503OnClosing: false,
    ...WITHOUT_SCHEMAS,
    // A path the router cannot decode (bad percent-encoding) fails before any hook runs: answer
    // it in the API's own shape, and after the token check like every other answer.
    frameworkErrors: (err, req, raw) => {
      const reply = raw as unknown as FastifyReply
      if (!authorized(req.headers.authorization, deps.token())) {
        void reply.code(401).header('www-authenticate', 'Bearer realm="breakwater"').send({ error: 'unauthorized', message: 'missing or wrong bearer token (Authorization: Bearer TOKEN)' })
        return
      }
      if ((err as { code?: string }).code === 'FST_ERR_MAX_PARAM_LENGTH') {
        void reply.code(414).send({ error: 'path_too_long', message: 'a name in the path is longer than 100 characters' })
        return
      }
      void reply.code(400).send({ error: 'bad_request', message: `the path cannot be read: ${err.message}` })
    }
  })
  const { control } = deps

  // DELETE carries a JSON body {reason} (SPEC §13); an empty body is an empty object.
  app.removeContentTypeParser('application/json')
  app.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, text, done) => {
    const source = String(text)
    if (source.trim() === '') { done(null, {}); return }
    try {
      done(null, JSON.parse(source))
    } catch (err) {
      done(new ControlError(400, 'bad_request', `body is not valid JSON: ${(err as Error).message}`), undefined)
    }
  })

  app.addHook('onRequest', async (req, reply) => {
    if (!authorized(req.headers.authorization, deps.token())) {
      await reply.code(401).header('www-authenticate', 'Bearer realm="breakwater"').send({ error: 'unauthorized', message: 'missing or wrong bearer token (Authorization: Bearer TOKEN)' })
    }
  })

  app.setErrorHandler(async (err: Error & { statusCode?: number, code?: string }, req, reply: FastifyReply) => {
    if (err instanceof ControlError) {
      // A well-formed call from an operator that was refused is part of the record too (who
      // tried what, when, and why it did not happen); bad input (400) is not.
      if (err.status !== 400 && req.method !== 'GET') {
        const b = (req.body ?? {}) as Body
        const { action, targets } = wantedBy(req, b, control)
        await control.auditRefused(action, targets, err, { reason: typeof b.reason === 'string' ? b.reason.trim() : '', requester: req.socket.remoteAddress ?? 'unknown' })
      }
      if (typeof err.details.retryAfterSeconds === 'number') void reply.header('retry-after', String(err.details.retryAfterSeconds))
      return await reply.code(err.status).send({ error: err.code, message: err.message, ...err.details })
    }
    const status = err.statusCode ?? 500
    if (status >= 400 && status < 500) {
      const code = status === 413 ? 'body_too_large' : status === 415 ? 'unsupported_media_type' : 'bad_request'
      return await reply.code(status).send({ error: code, message: err.message })
    }
    // The answer points at the log: the log must have it.
    deps.logger.error({ event: 'admin_error', method: req.method, path: req.routeOptions.url ?? req.url.split('?')[0], err }, 'admin API: unexpected error')
    return await reply.code(500).send({ error: 'internal', message: 'unexpected error; see the sidecar log' })
  })
  app.setNotFoundHandler(async (req, reply) => await reply.code(404).send({ error: 'not_found', message: `no such endpoint: ${req.method} ${req.url.split('?')[0] ?? ''}` }))

  app.get('/v1/state', async () => deps.state())

  app.put<{ Params: { key: string } }>('/v1/flags/:key', async (req, reply) => {
    const b = body(req, ['enabled', 'reason', 'ttl', 'scope'])
    if (typeof b.enabled !== 'boolean') throw new ControlError(400, 'bad_request', 'enabled must be true or false')
    const who = actor(req, b)
    if (fleetScope(b)) {
      const { value, persisted } = await control.setFleetOverride('flags', req.params.key, b.enabled, who, ttl(b))
      return await reply.send({ flag: req.params.key, scope: 'fleet', enabled: value.value, reason: value.reason, at: value.at, expiresAt: value.expiresAt, persisted })
    }
    const { value, persisted } = await control.setFlag(req.params.key, b.enabled, who, ttl(b))
    return await reply.send({ flag: req.params.key, ...value, persisted })
  })

  app.delete<{ Params: { key: string } }>('/v1/flags/:key', async (req, reply) => {
    const b = body(req, ['reason', 'scope'])
    if (fleetScope(b)) {
      const { persisted } = await control.setFleetOverride('flags', req.params.key, null, actor(req, b), null)
      const { enabled, origin } = control.flagAfter(req.params.key)
      return await reply.send({ flag: req.params.key, scope: 'fleet', override: null, enabled, origin, persisted })
    }
    const { value, persisted } = await control.clearFlag(req.params.key, actor(req, b))
    return await reply.send({ flag: req.params.key, override: null, ...value, persisted })
  })

  app.put<{ Params: { upstream: string } }>('/v1/circuits/:upstream', async (req, reply) => {
    const b = body(req, ['state', 'reason', 'ttl', 'scope'])
    if (b.state !== 'open' && b.state !== 'closed' && b.state !== 'auto') throw new ControlError(400, 'bad_request', 'state must be "open", "closed" or "auto"')
    if (fleetScope(b)) {
      const { persisted } = await control.setFleetOverride('circuits', req.params.upstream, b.state === 'auto' ? null : b.state, actor(req, b), ttl(b))
      return await reply.send({ ...control.circuitView(req.params.upstream), scope: 'fleet', persisted })
    }
    const { value, persisted } = await control.setCircuit(req.params.upstream, b.state, actor(req, b), ttl(b))
    return await reply.send({ ...value, persisted })
  })

  app.post('/v1/mitigations', async (req, reply) => {
    const b = body(req, ['action', 'reason', 'flags', 'upstreams', 'routes', 'to', 'requestsPerSecond', 'burst', 'ttl', 'scope'])
    if (typeof b.action !== 'string') throw new ControlError(400, 'bad_request', 'action is required: killSwitch, circuitBreak, rollback, failover or rateLimit')
    const who = actor(req, b)
    if (b.to !== undefined && b.to !== null && (typeof b.to !== 'string' || b.to === '')) throw new ControlError(400, 'bad_request', 'to must be the name of an upstream')
    const ttlMs = ttl(b)
    // Only these records end on their own; a ttl anywhere else would be a mitigation with no end
    // that the caller believes will lapse.
    if (ttlMs !== null && b.action !== 'failover' && b.action !== 'rateLimit') {
      throw new ControlError(400, 'bad_request', `ttl is taken by failover and rateLimit only, not ${b.action}: a kill or a forced circuit that lapses on its own is PUT /v1/flags/:key or PUT /v1/circuits/:upstream with ttl`)
    }
    const { value, persisted } = await control.mitigate({
      ...who,
      action: b.action,
      flags: stringList(b, 'flags'),
      upstreams: stringList(b, 'upstreams'),
      routes: stringList(b, 'routes'),
      to: b.to as string | null | undefined,
      requestsPerSecond: b.requestsPerSecond,
      burst: b.burst,
      ttlMs,
      scope: fleetScope(b) ? 'fleet' : 'local'
    })
    // A rollback has only started (its record said `running`): 202, follow it by its id.
    return await reply.code(value.action === 'rollback' ? 202 : 201).send({ ...value, persisted })
  })

  app.get<{ Params: { id: string } }>('/v1/mitigations/:id', async (req) => {
    const record = control.findMitigation(req.params.id)
    if (record === undefined) throw new ControlError(404, 'unknown_mitigation', `no mitigation with id "${req.params.id}"`)
    return record
  })

  app.delete<{ Params: { id: string } }>('/v1/mitigations/:id', async (req, reply) => {
    const b = body(req, ['reason'])
    const { value, persisted } = await control.lift(req.params.id, actor(req, b))
    return await reply.send({ ...value, persisted })
  })

  app.get<{ Querystring: { limit?: string } }>('/v1/audit', async (req) => {
    const raw = req.query.limit ?? '50'
    const limit = Number(raw)
    if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) throw new ControlError(400, 'bad_request', 'limit must be an integer from 1 to 10000')
    return { entries: await control.audit.newest(limit) }
  })

  app.post('/v1/reload', async (req, reply) => {
    const b = body(req, ['reason'])
    const who = actor(req, b, 'reload requested')
    const result = await deps.reload(who)
    if (result.draining === true) return await reply.code(409).send({ error: 'draining', message: 'the sidecar is shutting down: a reload is not applied while it drains', problems: result.problems })
    if (!result.ok) return await reply.code(422).send({ error: 'invalid_config', message: 'the new config was refused; the running config is kept', problems: result.problems })
    return await reply.send({ ok: true })
  })

  app.get('/v1/triage', async () => deps.triage())

  app.get('/v1/incidents', async () => ({ incidents: deps.incidents() }))

  // The post-mortem draft (SPEC §19): Markdown for people, JSON for tools (?format=json or Accept).
  app.get<{ Params: { id: string }, Querystring: { format?: string } }>('/v1/incidents/:id/report', async (req, reply) => {
    const format = req.query.format ?? (/\bapplication\/json\b/.test(req.headers.accept ?? '') ? 'json' : 'markdown')
    if (format !== 'json' && format !== 'markdown') throw new ControlError(400, 'bad_request', 'format must be "markdown" or "json"')
    const report = await deps.report(req.params.id)
    if (report === null) throw new ControlError(404, 'unknown_incident', `no incident with id "${req.params.id}"`)
    if (format === 'json') return report
    return await reply.type('text/markdown; charset=utf-8').send(renderReport(report))
  })

  return app
}
