/**
 * The outage drill (`breakwater drill`, `npm run drill`): a rehearsal of the worst hour, in
 * under a minute, on loopback. It starts a demo app and a sidecar with a realistic config,
 * drives steady traffic, ships a bad release of one route, and shows — live — the error rate
 * rising, the trigger firing, the rollback, the synthetic verification, and finally the
 * timeline: time to detect, to mitigate, to restore, and the post-mortem draft. Exit 0 when
 * service was restored.
 *
 * `restore: false` (`breakwater drill --no-restore`) rehearses the other ending: the rollback is
 * accepted but the fault is not in the release, so the verification fails and the incident is
 * escalated at once (SPEC §19). Exit 0 when it was escalated.
 */
import http from 'node:http'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Writable } from 'node:stream'
import type { AddressInfo } from 'node:net'
import { Pool } from './undici.js'
import { resolveConfig } from './config/load.js'
import { startSidecar, type Sidecar } from './sidecar.js'
import { renderReport, type IncidentReport } from './control/report.js'

export interface DrillOptions {
  out: (text: string) => void
  /** Overwrite the progress line in place (a terminal). */
  tty: boolean
  /** Requests per second of steady load. */
  rate?: number
  /** Seconds of steady state before the bad release. */
  warmupSeconds?: number
  /** Give up after this many seconds. */
  timeoutSeconds?: number
  /** false: the rollback does not fix the fault (the escalation rehearsal). Default true. */
  restore?: boolean
  /** Stop early (the reader of the output went away): everything started is closed, then it rejects. */
  signal?: AbortSignal
}

/** One of the sidecar's own log events the drill shows: trigger fired, mitigation, incident phase. */
export interface DrillEvent {
  time: string
  event: string
  phase: string | null
  action: string | null
}

export interface DrillResult {
  restored: boolean
  timeToDetectSeconds: number | null
  timeToMitigateSeconds: number | null
  timeToRestoreSeconds: number | null
  /** Seconds from the bad release to the escalation, when there was one. */
  escalatedSeconds: number | null
  /** Whether the demo app received the rollback webhook. */
  rollbackReceived: boolean
  /** The sidecar's trigger, mitigation and incident events, in order. */
  events: DrillEvent[]
  /** The incident's post-mortem draft (`GET /v1/incidents/:id/report?format=json`); null when none opened. */
  report: IncidentReport | null
}

interface Demo {
  url: string
  bad: boolean
  /** Whether a rollback fixes the fault. */
  fixable: boolean
  rolledBackAt: number | null
  /** Notifications the sidecar sent to the demo's webhook. */
  notifications: Array<Record<string, unknown>>
  /** Rollback webhook calls received. */
  rollbacks: number
  close: () => Promise<void>
}

/**
 * The sidecar settings both drills give the demo service: its two routes (checkout behind a
 * kill switch), the rollback webhook the demo answers, and an error-rate trigger over `window`.
 */
export function demoService (demo: Demo, window: string, minRequests: number): Record<string, unknown> {
  return {
    service: 'shop',
    version: '2.0.1',
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout', timeoutMs: 2000 },
      { name: 'catalog', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true },
    rollbackTriggers: [{ name: 'error_rate_5pct', metric: 'error_rate', threshold: 0.05, window, minRequests, action: 'rollback' }],
    rollback: { type: 'webhook', url: `${demo.url}/__deploy/rollback`, cooldown: '10m' }
  }
}

/** The demo app: /checkout fails half the time while the bad release is live; a webhook rolls it back. */
export async function startDemo (fixable = true): Promise<Demo> {
  const demo: Demo = { url: '', bad: false, fixable, rolledBackAt: null, notifications: [], rollbacks: 0, close: async () => {} }
  const server = http.createServer((req, res) => {
    if (req.method === 'POST' && req.url === '/__notify') {
      let text = ''
      req.on('data', (c: Buffer) => { text += c.toString('utf8') })
      req.on('end', () => {
        try { demo.notifications.push(JSON.parse(text) as Record<string, unknown>) } catch { /* not JSON: ignored */ }
        res.writeHead(200, { 'content-type': 'application/json' })
        res.end('{}')
      })
      return
    }
    if (req.method === 'POST' && req.url === '/__deploy/rollback') {
      req.resume()
      if (demo.fixable) demo.bad = false
      demo.rolledBackAt = Date.now()
      demo.rollbacks++
      res.writeHead(202, { 'content-type': 'application/json' })
      res.end('{"rolledBack":true}')
      return
    }
    req.resume()
    if (req.url?.startsWith('/checkout') === true && demo.bad && Math.random() < 0.5) {
      res.writeHead(500, { 'content-type': 'application/json' })
      res.end('{"error":"NullPointerException in CheckoutController"}')
      return
    }
    res.writeHead(200, { 'content-type': 'application/json' })
    res.end(`{"ok":true,"path":${JSON.stringify(req.url)}}`)
  })
  server.keepAliveTimeout = 30_000
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  demo.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  demo.close = async () => {
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return demo
}

export async function runDrill (o: DrillOptions): Promise<DrillResult> {
  const rate = o.rate ?? 100
  const warmup = o.warmupSeconds ?? 3
  const timeout = o.timeoutSeconds ?? 40
  const fixable = o.restore !== false
  const stateDir = mkdtempSync(join(tmpdir(), 'breakwater-drill-'))
  const demo = await startDemo(fixable)
  const events: Array<Record<string, unknown>> = []
  const sink = new Writable({
    write (chunk: Buffer, _enc, cb) {
      for (const line of chunk.toString('utf8').split('\n')) if (line !== '') events.push(JSON.parse(line) as Record<string, unknown>)
      cb()
    }
  })
  const { config } = resolveConfig({
    ...demoService(demo, '5s', 20),
    stateDir,
    listen: { proxy: { host: '127.0.0.1', port: 0 }, ops: { host: '127.0.0.1', port: 0 }, admin: { host: '127.0.0.1', port: 0 } },
    upstreams: { app: { url: demo.url, critical: true } },
    verification: { synthetics: [{ route: 'checkout', path: '/checkout/health-probe', expectStatus: 200 }], intervalMs: 300, successes: 3, windowMs: '3s', timeoutMs: fixable ? '30s' : '6s' },
    notifications: { webhooks: [`${demo.url}/__notify`], escalateAfter: '1m' },
    logging: { level: 'info', accessLog: false },
    shutdown: { drainDelayMs: 0, timeoutMs: 1000 }
  })
  let sidecar: Sidecar | null = null
  const pool = new Pool('http://127.0.0.1:1', { connections: 16 })
  let load: NodeJS.Timeout | null = null
  try {
    sidecar = await startSidecar(config, { logDestination: sink, adminToken: 'drill-token-0123456789abcdef' })
    const proxy = new Pool(sidecar.addresses.proxy, { connections: 16 })
    const start = Date.now()
    const seconds = new Map<number, { ok: number, err: number }>()
    let sent = 0
    const fire = (i: number): void => {
      const path = i % 2 === 0 ? '/checkout/cart' : '/catalog/items'
      const sec = Math.floor((Date.now() - start) / 1000)
      proxy.request({ path, method: 'GET' }).then(async (res) => {
        await res.body.dump()
        const b = seconds.get(sec) ?? { ok: 0, err: 0 }
        if (res.statusCode >= 500) b.err++
        else b.ok++
        seconds.set(sec, b)
      }, () => {
        const b = seconds.get(sec) ?? { ok: 0, err: 0 }
        b.err++
        seconds.set(sec, b)
      })
    }
    const perTick = Math.max(1, Math.round(rate / 50))
    load = setInterval(() => { for (let k = 0; k < perTick; k++) fire(sent++) }, 20)

    o.out(`Breakwater drill: service "shop" ${config.version} behind a sidecar, ${rate} req/s of steady traffic\n`)
    o.out('trigger: error_rate > 5% over 5s (min 20 requests) → rollback (webhook); verification: 3 synthetic checks of /checkout + real traffic\n')
    if (!fixable) o.out('this time the fault is not in the release: the rollback will not fix it (verification fails → escalation)\n')
    o.out('\n')
    let onset: number | null = null
    let times: Omit<DrillResult, 'rollbackReceived' | 'events' | 'report'> = { restored: false, timeToDetectSeconds: null, timeToMitigateSeconds: null, timeToRestoreSeconds: null, escalatedSeconds: null }
    let lastPrinted = -1
    while (true) {
      o.signal?.throwIfAborted()
      await new Promise((resolve) => setTimeout(resolve, 200))
      const now = Date.now()
      const t = (now - start) / 1000
      if (onset === null && t >= warmup) {
        onset = now
        demo.bad = true
        o.out(`${o.tty ? '\r\x1b[K' : ''}+${t.toFixed(1)}s  deploying a bad release of /checkout: half of its requests now fail\n`)
      }
      const sec = Math.floor((now - start) / 1000) - 1
      const b = seconds.get(sec) ?? { ok: 0, err: 0 }
      const total = b.ok + b.err
      const trig = sidecar.triggers.status()[0]
      const incident = sidecar.verifier.incidents[0]
      const verifying = incident === undefined ? '-' : incident.status === 'verifying' ? `verifying ${incident.checks.syntheticPassesInARow}/3` : incident.status
      const line = `+${t.toFixed(1)}s  ${total} req/s  errors ${total === 0 ? '-' : `${((b.err / total) * 100).toFixed(0)}%`}  trigger ${trig?.state ?? '-'}${trig?.value != null ? ` (${(trig.value * 100).toFixed(1)}%)` : ''}  mitigation ${incident?.mitigation?.action ?? '-'}  restoration ${verifying}`
      if (o.tty) o.out(`\r\x1b[K${line}`)
      else if (Math.floor(t) !== lastPrinted) { lastPrinted = Math.floor(t); o.out(`${line}\n`) }
      // Restored ends the drill; not restored, once it is escalated.
      if (incident !== undefined && onset !== null && (incident.status === 'restored' || (incident.status === 'not_restored' && incident.escalatedAt !== null))) {
        const since = (at: string | null): number | null => at === null ? null : (Date.parse(at) - (onset as number)) / 1000
        times = {
          restored: incident.status === 'restored',
          timeToDetectSeconds: since(incident.detectedAt),
          timeToMitigateSeconds: since(incident.mitigatedAt),
          timeToRestoreSeconds: since(incident.restoredAt),
          escalatedSeconds: since(incident.escalatedAt)
        }
        break
      }
      if (t > timeout) break
    }
    if (load !== null) clearInterval(load)
    await proxy.close()
    o.signal?.throwIfAborted()
    const incident = sidecar.verifier.incidents[0]
    const report = incident === undefined ? null : await sidecar.incidentReport(incident.id)
    const shown = events.filter((e) => e.event === 'trigger_fired' || e.event === 'mitigation' || e.event === 'incident')
    const result: DrillResult = {
      ...times,
      rollbackReceived: demo.rolledBackAt !== null,
      events: shown.map((e) => ({ time: String(e.time), event: String(e.event), phase: e.phase === undefined ? null : String(e.phase), action: e.action === undefined ? null : String(e.action) })),
      report
    }
    const f = (x: number | null): string => (x === null ? 'n/a' : `${x.toFixed(1)} s`)
    o.out(`${o.tty ? '\n' : ''}\nTimeline (from the bad release):\n`)
    o.out(`  fault onset          +0.0 s\n`)
    o.out(`  detected             +${f(result.timeToDetectSeconds)}   trigger error_rate_5pct fired\n`)
    o.out(`  mitigated            +${f(result.timeToMitigateSeconds)}   rollback webhook accepted${result.rollbackReceived ? '' : ' (NOT received)'}\n`)
    if (fixable || result.restored) o.out(`  restored (verified)  +${f(result.timeToRestoreSeconds)}   synthetic checks and real traffic healthy\n`)
    else o.out(`  verification failed  the rollback did not bring /checkout back\n`)
    const escalation = demo.notifications.find((n) => n.event === 'escalated')
    if (result.escalatedSeconds !== null) o.out(`  escalated            +${f(result.escalatedSeconds)}   ${escalation !== undefined ? `sent: ${String(escalation.summary)}` : 'notification not received yet'}\n`)
    const lines = result.events.map((e) => `${e.time.slice(11, 23)}  ${e.event}${e.phase !== null ? `:${e.phase}` : ''}${e.action !== null ? ` ${e.action}` : ''}`)
    o.out(`\nSidecar events:\n${lines.map((l) => `  ${l}`).join('\n')}\n`)
    if (report !== null) o.out(`\nPost-mortem draft (breakwater incident report ${report.incident}):\n\n${renderReport(report)}`)
    if (result.restored) o.out(`\nService restored ${f(result.timeToRestoreSeconds)} after the bad release (target: under 10 s).\n`)
    else if (result.escalatedSeconds !== null) o.out(`\nService was NOT restored; the incident was escalated ${f(result.escalatedSeconds)} after the bad release.\n`)
    else o.out('\nService was NOT restored.\n')
    return result
  } finally {
    if (load !== null) clearInterval(load)
    await pool.close().catch(() => {})
    if (sidecar !== null) await sidecar.close().catch(() => {})
    await demo.close()
    rmSync(stateDir, { recursive: true, force: true })
  }
}
