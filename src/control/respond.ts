/**
 * What a fired trigger does (SPEC §7, §14), through the same mitigation code as the admin
 * API, audited with the trigger as the reason:
 * - `notify`: tell people, change nothing;
 * - `killSwitch` / `circuitBreak`: the mitigation, on the trigger's flags / upstreams;
 * - `rollback`: only when this sidecar's version or config changed within
 *   `requireRecentChange` (30 min): a version that has run fine for days is not what broke,
 *   so the trigger notifies with the triage attached instead. The cooldown and "never the same
 *   version twice" hold, so one incident causes one rollback.
 *
 * In a fleet (SPEC §16), a `rollback` or `notify` trigger first claims its incident: only the
 * claimant rolls back and notifies; the others record that they follow it.
 */
import type { Config, TriggerConfig } from '../config/types.js'
import { ControlError, type ControlPlane } from './control-plane.js'
import type { NotificationEvent, Notifier } from './notify.js'
import { describeReading, type Reading, type TriggerAction } from './triggers.js'

export interface RespondDeps {
  config: () => Config
  control: ControlPlane
  notifier: Notifier
  /** The current triage, attached when a trigger only notifies. */
  triage: () => Record<string, unknown>
  /**
   * In a fleet: who acts for this trigger's incident. Null at once without a fleet, so a
   * sidecar alone acts without yielding (as before); a promise of null: it decides alone.
   * `incident`: this sidecar's incident id, which names the fleet's incident if it is the first.
   */
  claim?: (trigger: TriggerConfig, incident?: string) => Promise<Claimed | null> | null
  /** In a fleet: the leader's `trigger_fired` reached every channel (recorded on the incident key). */
  announced?: (trigger: TriggerConfig) => void
  /** In a fleet: one receiver (`receiverName`) took the leader's `trigger_fired` (recorded on the incident key). */
  announcedTo?: (trigger: TriggerConfig, receiver: string) => void
}

/** Who acts for a trigger's incident in a fleet, and what a holder before this one announced. */
interface Claimed {
  leader: boolean
  holder: string
  announced?: boolean
  /** The receivers that took the incident's `trigger_fired` from a holder before this one. */
  announcedTo?: readonly string[]
  incident?: string
}

export function createTriggerAction (deps: RespondDeps): TriggerAction {
  return async (trigger: TriggerConfig, reading: Reading, incident: { id: string, opened: boolean } | null): Promise<string> => {
    const cfg = deps.config()
    const reason = `trigger ${trigger.name}: ${describeReading(trigger, reading)}`
    const who = { reason, requester: `trigger:${trigger.name}`, source: `trigger:${trigger.name}` }
    let action = trigger.action
    let why: string | null = null
    if (action === 'rollback') {
      why = recentChange(cfg, deps.control)
      if (why === null) action = 'notify'
    }
    const fired: NotificationEvent = {
      kind: 'trigger_fired',
      service: cfg.service,
      version: cfg.version,
      trigger: trigger.name,
      summary: reason,
      details: {
        metric: trigger.metric,
        value: reading.value,
        threshold: trigger.threshold,
        windowSeconds: trigger.windowMs / 1000,
        requests: reading.requests,
        errors: reading.errors,
        action: trigger.action,
        ...(trigger.action === 'rollback' && action === 'notify'
          ? { rollback: 'not run: no version or config change within requireRecentChange', triage: deps.triage() }
          : {})
      },
      time: new Date().toISOString()
    }
    let claim: Claimed | null = null
    if (trigger.action === 'rollback' || trigger.action === 'notify') {
      const pending = deps.claim?.(trigger, incident?.id) ?? null
      claim = pending === null ? null : await pending
      if (claim !== null && !claim.leader) {
        // Alertmanager groups every sidecar's alert into one notification: followers post theirs.
        deps.notifier.alertmanager.handle(fired)
        const outcome = `follower: ${claim.holder} acts for this incident`
        void deps.control.auditEvent({ action: 'trigger.follow', targets: [trigger.name], reason, result: outcome, requester: who.requester, leader: claim.holder })
        return outcome
      }
    }
    // Fired again into its incident still open (its state is in memory: a restart re-arms it
    // while the failure goes on): announced once, when it opened. Announced again, PagerDuty
    // would go back to `error` after an escalation and the status page to `investigating`.
    // Named as the fleet names the incident, so that a successor's announcement is the leader's.
    const named = claim?.incident ?? incident?.id
    if (named !== undefined) fired.incident = named
    const again = incident !== null && !incident.opened
    if (again) void deps.control.auditEvent({ action: 'trigger.refire', targets: [trigger.name], reason, result: `incident ${incident.id} still open: not announced again`, requester: who.requester })
    else if (claim?.announced === true) {
      // Taking over from a leader that announced the incident (the key says so): a second
      // announcement would be a second page for one incident. Its own alert goes to Alertmanager,
      // as every sidecar's does.
      deps.notifier.alertmanager.handle(fired)
      void deps.control.auditEvent({ action: 'trigger.refire', targets: [trigger.name], reason, result: 'incident announced by the fleet leader before: not announced again', requester: who.requester })
    } else if (claim?.leader === true) {
      // A leader before this one may have reached some receivers before it died: they are not
      // sent the announcement again (the key records each that took it), the others are.
      deps.notifier.notify(fired, () => { deps.announced?.(trigger) }, { skip: claim.announcedTo, accepted: (receiver) => { deps.announcedTo?.(trigger, receiver) } })
    } else deps.notifier.notify(fired)
    if (action === 'notify') {
      const outcome = trigger.action === 'rollback' ? 'notified: no recent change, rollback not run' : 'notified'
      void deps.control.auditEvent({ action: 'trigger.notify', targets: [trigger.name], reason, result: outcome, requester: who.requester })
      return outcome
    }
    const flags = trigger.flags === null ? undefined : [...trigger.flags]
    const upstreams = trigger.upstreams !== null ? [...trigger.upstreams] : trigger.upstream !== null && action === 'circuitBreak' ? [trigger.upstream] : undefined
    try {
      const { value } = await deps.control.mitigate({ ...who, action, trigger: trigger.name, flags, upstreams })
      return `${action} ${value.id}${why !== null ? ` (${why})` : ''}`
    } catch (err) {
      if (!(err instanceof ControlError)) throw err
      // Audited as an operator's refused mitigation is, naming what it was about.
      const named = [...(flags ?? []), ...(upstreams ?? [])]
      await deps.control.auditRefused(`mitigation.${action}`, named.length > 0 ? named : deps.control.impliedTargets(action), err, { ...who, trigger: trigger.name })
      return `skipped: ${err.code} (${err.message})`
    }
  }
}

/** Why a rollback is plausible now, or null when nothing changed recently. */
function recentChange (cfg: Config, control: ControlPlane): string | null {
  const limit = cfg.rollback?.requireRecentChangeMs ?? 0
  if (limit === 0) return 'requireRecentChange off'
  const now = Date.now()
  if (control.versionSince !== '' && now - Date.parse(control.versionSince) <= limit) return `version ${cfg.version} since ${control.versionSince}`
  if (control.configSince !== '' && now - Date.parse(control.configSince) <= limit) return `config changed at ${control.configSince}`
  return null
}
