/**
 * Three in-process sidecars of one service (`shop`) in a fleet on a real etcd (SPEC §16).
 */
import type { Test } from 'tap'
import { startTestSidecar, type TestSidecar } from './sidecar.js'
import { startUpstream, type TestUpstream } from './upstream.js'
import { startEtcd, type EtcdCluster } from './etcd.js'
import { eventually, send, sleep } from './http.js'
import './linger.js'

/** The config of one sidecar of service `shop`, in the fleet on `endpoints`. */
export function fleetConfig (url: string, endpoints: string[], extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    service: 'shop',
    upstreams: { app: { url } },
    circuitBreakers: { app: {} },
    routes: [
      { name: 'checkout', match: { pathPrefix: '/checkout' }, upstream: 'app', killSwitch: 'newCheckout' },
      { name: 'rest', match: { pathPrefix: '/' }, upstream: 'app' }
    ],
    featureFlags: { newCheckout: true },
    fleet: { etcd: { endpoints, prefix: '/bw-test' }, leaseTtl: '2s' },
    ...extra
  }
}

/** Three sidecars of one service, each with its own state dir, named s0..s2. */
export async function startFleet (t: Test, url: string, endpoints: string[], extra: Record<string, unknown> = {}): Promise<TestSidecar[]> {
  const out: TestSidecar[] = []
  for (let i = 0; i < 3; i++) out.push(await startTestSidecar(t, fleetConfig(url, endpoints, extra), { instance: `s${i}` }))
  return out
}

export interface ConnectedFleet {
  etcd: EtcdCluster
  up: TestUpstream
  fleet: [TestSidecar, TestSidecar, TestSidecar]
}

/**
 * An etcd of `size` members, an upstream, and three sidecars connected to etcd; with
 * `knows: 'first'` the sidecars are given only the first member's endpoint.
 */
export async function startConnectedFleet (t: Test, extra: Record<string, unknown> = {}, size: 1 | 3 = 1, knows: 'all' | 'first' = 'all'): Promise<ConnectedFleet> {
  const etcd = await startEtcd(t, size)
  const up = await startUpstream()
  t.teardown(up.close)
  const fleet = await startFleet(t, up.url, knows === 'all' ? etcd.endpoints : etcd.endpoints.slice(0, 1), extra) as ConnectedFleet['fleet']
  if (!await eventually(() => fleet.every((s) => s.sidecar.fleet?.connected === true), 30_000)) throw new Error('the sidecars did not connect to etcd')
  return { etcd, up, fleet }
}

/** Keep traffic flowing through the running sidecars of `fleet` that `to` picks (asked each round) until the test ends (a failing upstream keeps their triggers fired). */
export function keepSending (t: Test, fleet: TestSidecar[], to: (s: TestSidecar) => boolean = () => true): void {
  let stopped = false
  t.teardown(() => { stopped = true })
  void (async () => {
    while (!stopped) {
      await Promise.all(fleet.filter(to).map(async (s) => { if (s.sidecar.addresses.proxy !== '') await send(s.proxy, '/other').catch(() => null) }))
      await sleep(50)
    }
  })()
}

/**
 * Hold `s`'s watch events for incident keys, as a busy stream delays them: each waits in `late`
 * (call it to hand it on); `release` hands on the rest in order and stops holding, `drop` discards
 * them (as a resync read skips what it already covers) and stops. Stopped at teardown too.
 */
export function holdIncidentEvents (t: Test, s: TestSidecar): { late: Array<() => void>, release: () => void, drop: () => void } {
  const watched = s.sidecar.fleet as unknown as { incidentEvent: (incident: string, kv: unknown, deleted: boolean) => void }
  const deliver = watched.incidentEvent.bind(watched)
  const late: Array<() => void> = []
  watched.incidentEvent = (incident, kv, deleted) => { late.push(() => { deliver(incident, kv, deleted) }) }
  const stop = (): void => { watched.incidentEvent = deliver }
  t.teardown(stop)
  return { late, release: () => { stop(); for (const event of late.splice(0)) event() }, drop: () => { stop(); late.splice(0) } }
}
