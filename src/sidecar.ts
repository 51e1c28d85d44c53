/**
 * Builds a running sidecar from a config: logger, data plane, listeners, health checks,
 * metrics. Used by `main.ts` for the real process and directly by tests (every port may be
 * 0). Owns reload and the graceful shutdown sequence; knows nothing of signals or exit codes.
 */
import type { AddressInfo } from 'node:net'
import type { Server } from 'node:http'
import { Registry } from 'prom-client'
import type { DestinationStream, Logger } from 'pino'
import type { Config } from './config/types.js'
import { loadConfigFile, ConfigError } from './config/load.js'
import { createLogger } from './log/logger.js'
import { DataPlane } from './proxy/dataplane.js'
import { createProxyServer, type ProxyServer } from './proxy/server.js'
import { HealthChecker } from './proxy/health-check.js'
import { HealthPolicy } from './ops/health.js'
import { createOpsServer } from './ops/server.js'
import { registerMetrics } from './ops/metrics.js'
import { FlagSnapshot } from './flags/snapshot.js'

export interface SidecarOptions {
  /** Where log lines go (tests); stdout, bounded, when omitted. */
  logDestination?: DestinationStream
  registry?: Registry
}

export interface Addresses {
  proxy: string
  ops: string
  egress: string | null
}

export interface ReloadResult {
  ok: boolean
  problems: readonly string[]
}

export class Sidecar {
  config: Config
  readonly logger: Logger
  readonly registry: Registry
  readonly dataPlane: DataPlane
  readonly health: HealthPolicy
  readonly flags: FlagSnapshot
  addresses: Addresses = { proxy: '', ops: '', egress: null }
  private readonly healthChecker: HealthChecker
  private readonly proxy: ProxyServer
  private readonly egress: ProxyServer | null
  private readonly ops: ReturnType<typeof createOpsServer>
  private readonly flushLog: () => void
  private readonly reloads = { ok: 0, failed: 0 }
  private stopping: Promise<void> | null = null
  private forceStop: (() => void) | null = null

  constructor (config: Config, options: SidecarOptions = {}) {
    this.config = config
    const log = createLogger(config.logging.level, config.service, options.logDestination)
    this.logger = log.logger
    this.flushLog = log.flush
    this.registry = options.registry ?? new Registry()
    this.flags = new FlagSnapshot(config, this.logger)
    this.dataPlane = new DataPlane(config, { logger: this.logger, flags: this.flags })
    this.health = new HealthPolicy(this.dataPlane)
    this.healthChecker = new HealthChecker(this.logger)
    const maxConnections = (): number => this.config.limits.maxConnections
    this.proxy = createProxyServer(this.dataPlane, config.listen.proxy, maxConnections)
    this.egress = config.listen.egress === null ? null : createProxyServer(this.dataPlane, config.listen.egress, maxConnections)
    this.ops = createOpsServer(this.health, this.registry)
    registerMetrics(this.registry, { dataPlane: this.dataPlane, flags: this.flags, log: log.stats, reloads: this.reloads })
  }

  async listen (): Promise<Addresses> {
    const { listen } = this.config
    // Flags first: no request may be served before kill switches are known.
    await this.flags.start(this.config)
    const proxy = await listenOn(this.proxy.server, listen.proxy.host, listen.proxy.port)
    const egress = this.egress === null || listen.egress === null ? null : await listenOn(this.egress.server, listen.egress.host, listen.egress.port)
    const ops = await this.ops.listen({ host: listen.ops.host, port: listen.ops.port })
    this.addresses = { proxy, ops: normaliseFastifyAddress(ops), egress }
    this.dataPlane.overload.start()
    this.healthChecker.start(this.dataPlane.runtime.upstreams.values())
    this.logger.info({ event: 'listening', ...this.addresses, version: this.config.version, routes: this.config.routes.length, upstreams: Object.keys(this.config.upstreams).length }, 'listening')
    return this.addresses
  }

  /** Swap in a validated config without dropping a connection. */
  async apply (next: Config): Promise<void> {
    await this.flags.apply(next)
    const prev = this.config
    if (JSON.stringify(prev.listen) !== JSON.stringify(next.listen)) {
      this.logger.warn({ event: 'config_reload', listen: next.listen }, 'listener changes take effect at the next restart')
    }
    this.dataPlane.apply(next)
    this.logger.level = next.logging.level
    this.config = { ...next, listen: prev.listen }
    this.healthChecker.start(this.dataPlane.runtime.upstreams.values())
  }

  /** Re-read the config file; an invalid one is refused and the running config kept. */
  async reload (): Promise<ReloadResult> {
    const source = this.config.source
    if (source === null) return { ok: false, problems: ['this sidecar was not started from a file'] }
    try {
      const { config, warnings } = await loadConfigFile(source)
      for (const w of warnings) this.logger.warn({ event: 'config_warning' }, w)
      await this.apply(config)
      this.reloads.ok++
      this.logger.info({ event: 'config_reload', result: 'ok', source, version: config.version }, 'config reloaded')
      return { ok: true, problems: [] }
    } catch (err) {
      const problems = err instanceof ConfigError ? err.problems : [(err as Error).message]
      this.reloads.failed++
      this.logger.error({ event: 'config_reload', result: 'refused', source, problems }, 'config reload refused; the running config is kept')
      return { ok: false, problems }
    }
  }

  /**
   * Graceful stop (SPEC §10): `/health` says draining at once, the proxy keeps serving for
   * `drainDelayMs` while load balancers notice, then stops accepting and lets requests in
   * flight finish for up to `timeoutMs`. The egress listener, used by the app for its own
   * calls, stays open to the very end so draining never cuts the app off.
   */
  async shutdown (): Promise<void> {
    this.stopping ??= this.runShutdown()
    return await this.stopping
  }

  /** Cut a graceful shutdown short (a second signal). */
  hurry (): void {
    this.forceStop?.()
  }

  private async runShutdown (): Promise<void> {
    const { drainDelayMs, timeoutMs } = this.config.shutdown
    this.health.draining = true
    this.dataPlane.draining = true
    this.logger.info({ event: 'shutdown', phase: 'draining', drainDelayMs, timeoutMs }, 'draining')
    let hurried = false
    const hurry = new Promise<void>((resolve) => { this.forceStop = () => { hurried = true; resolve() } })
    await Promise.race([delay(drainDelayMs), hurry])

    this.proxy.server.close()
    this.proxy.server.closeIdleConnections()
    this.logger.info({ event: 'shutdown', phase: 'stopped_accepting', inFlight: this.dataPlane.stats.inFlight }, 'stopped accepting connections')
    const deadline = performance.now() + timeoutMs
    while (!hurried && this.dataPlane.stats.inFlight > 0 && performance.now() < deadline) {
      await Promise.race([delay(20), hurry])
    }
    const abandoned = this.dataPlane.stats.inFlight
    this.proxy.server.closeAllConnections()
    this.healthChecker.stop()
    if (this.egress !== null) {
      this.egress.server.close()
      this.egress.server.closeAllConnections()
    }
    await this.dataPlane.destroy()
    await this.flags.close()
    await this.ops.close()
    this.logger.info({ event: 'shutdown', phase: 'stopped', abandoned }, 'stopped')
    this.flushLog()
  }

  /** Stop at once (tests). */
  async close (): Promise<void> {
    this.forceStop?.()
    this.config = { ...this.config, shutdown: { drainDelayMs: 0, timeoutMs: 0 } }
    await this.shutdown()
  }
}

/** Build and start a sidecar. */
export async function startSidecar (config: Config, options: SidecarOptions = {}): Promise<Sidecar> {
  const sidecar = new Sidecar(config, options)
  try {
    await sidecar.listen()
  } catch (err) {
    await sidecar.close().catch(() => {})
    throw err
  }
  return sidecar
}

async function listenOn (server: Server, host: string, port: number): Promise<string> {
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject)
    server.listen(port, host, () => { server.off('error', reject); resolve() })
  })
  const a = server.address() as AddressInfo
  return `http://${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`
}

function normaliseFastifyAddress (address: string): string {
  return address.replace('://localhost', '://127.0.0.1')
}

async function delay (ms: number): Promise<void> {
  if (ms <= 0) return
  await new Promise<void>((resolve) => setTimeout(resolve, ms).unref())
}
