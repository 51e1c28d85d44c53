/**
 * A real local Statuspage: it keeps the page's incidents and answers the three calls Breakwater
 * makes (create, update by id, list the unresolved ones with their metadata), records every
 * request, and can lose a create's answer the way a timeout or a dying sidecar does.
 */
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Delivery } from './receiver.js'

export interface PageIncident {
  id: string
  name: string
  status: string
  metadata: Record<string, unknown>
  /** Every status it was given, in order. */
  statuses: string[]
}

export interface StatusPage {
  url: string
  deliveries: Delivery[]
  incidents: Map<string, PageIncident>
  /** The next this many creates are kept and then answered 500: created, but the answer lost. */
  failAfterCreate: number
  /** Creates are kept and their answers held until `releaseCreates` (or close). */
  holdCreates: boolean
  releaseCreates: () => void
  /** Updates are applied and their answers held until `releaseCreates` (or close). */
  holdUpdates: boolean
  close: () => Promise<void>
}

const UNRESOLVED = new Set(['investigating', 'identified', 'monitoring'])

export async function startStatusPage (): Promise<StatusPage> {
  let created = 0
  const held: Array<() => void> = []
  const page: StatusPage = {
    url: '',
    deliveries: [],
    incidents: new Map(),
    failAfterCreate: 0,
    holdCreates: false,
    holdUpdates: false,
    releaseCreates: () => { for (const answer of held.splice(0)) answer() },
    close: async () => {}
  }
  const server = http.createServer((req, res) => {
    let text = ''
    req.on('data', (c: Buffer) => { text += c.toString('utf8') })
    req.on('end', () => {
      let body: any = text
      try { body = JSON.parse(text) } catch {}
      const url = req.url ?? ''
      page.deliveries.push({ method: req.method ?? '', url, headers: req.headers, body, at: Date.now() })
      const answer = (status: number, value: unknown): void => {
        res.writeHead(status, { 'content-type': 'application/json' })
        res.end(JSON.stringify(value))
      }
      if (!String(req.headers.authorization ?? '').startsWith('OAuth ')) { answer(401, { error: 'unauthorized' }); return }
      const path = url.split('?')[0] ?? ''
      const m = /^\/v1\/pages\/[^/]+\/incidents(?:\/([^/]+))?$/.exec(path)
      if (m === null) { answer(404, { error: 'not found' }); return }
      const which = m[1]
      if (req.method === 'GET' && which === 'unresolved') {
        answer(200, [...page.incidents.values()].filter((i) => UNRESOLVED.has(i.status)).map(({ statuses: _, ...i }) => i))
        return
      }
      if (req.method === 'POST' && which === undefined) {
        const i = body?.incident ?? {}
        const incident: PageIncident = { id: `sp-incident-${++created}`, name: String(i.name), status: String(i.status), metadata: i.metadata ?? {}, statuses: [String(i.status)] }
        page.incidents.set(incident.id, incident)
        const { statuses: _, ...shown } = incident
        if (page.failAfterCreate > 0) {
          page.failAfterCreate--
          answer(500, { error: 'internal error' })
        } else if (page.holdCreates) {
          held.push(() => { answer(201, shown) })
        } else {
          answer(201, shown)
        }
        return
      }
      if (req.method === 'PATCH' && which !== undefined && which !== 'unresolved') {
        const incident = page.incidents.get(decodeURIComponent(which))
        if (incident === undefined) { answer(404, { error: 'no such incident' }); return }
        incident.status = String(body?.incident?.status)
        incident.statuses.push(incident.status)
        const { statuses: _, ...shown } = incident
        if (page.holdUpdates) held.push(() => { answer(200, shown) })
        else answer(200, shown)
        return
      }
      answer(405, { error: 'method not allowed' })
    })
  })
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  page.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`
  page.close = async () => {
    page.releaseCreates()
    server.closeAllConnections()
    await new Promise<void>((resolve) => server.close(() => resolve()))
  }
  return page
}
