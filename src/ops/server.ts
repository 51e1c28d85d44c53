/**
 * The ops listener (SPEC §9): `/health`, `/ready`, `/live`, `/metrics`, read-only, no auth,
 * on its own port. Nothing else is served here, and nothing here mutates.
 */
import Fastify, { type FastifyInstance, type FastifyReply } from 'fastify'
import type { Registry } from 'prom-client'
import type { HealthPolicy, HealthReport } from './health.js'
import { WITHOUT_SCHEMAS } from './fastify-options.js'

export function createOpsServer (health: HealthPolicy, registry: Registry): FastifyInstance {
  const app = Fastify({ logger: false, return503OnClosing: false, forceCloseConnections: true, ...WITHOUT_SCHEMAS })

  const answer = async (report: HealthReport, reply: FastifyReply): Promise<unknown> =>
    await reply.code(report.status === 'ok' ? 200 : 503).header('cache-control', 'no-store').send(report)
  app.get('/health', async (_req, reply) => await answer(health.report(), reply))
  app.get('/ready', async (_req, reply) => await answer(health.readiness(), reply))
  // Liveness answers while the event loop does; it never consults upstreams.
  app.get('/live', async (_req, reply) => await reply.header('cache-control', 'no-store').send({ status: 'ok' }))
  app.get('/metrics', async (_req, reply) => {
    const body = await registry.metrics()
    return await reply.header('content-type', registry.contentType).send(body)
  })
  app.setNotFoundHandler(async (req, reply) => await reply.code(404).send({ error: 'not_found', message: `the ops listener serves only /health, /ready, /live and /metrics (got ${req.method} ${req.url.split('?')[0] ?? ''})` }))
  return app
}
