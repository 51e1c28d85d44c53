/**
 * One timer per key that fires once at an absolute time (an incident's escalation deadline):
 * unref'd, so a pending deadline never keeps the process alive; re-arming a key replaces its
 * timer; `stop` clears them all. A deadline already past fires on the next tick.
 */
export class Deadlines {
  private readonly timers = new Map<string, NodeJS.Timeout>()

  /** Call `fire` at `atMs` (epoch ms) unless disarmed first. */
  arm (key: string, atMs: number, fire: () => void): void {
    this.disarm(key)
    const timer = setTimeout(() => {
      // Timers run on the monotonic clock; the wall clock may still read a millisecond short
      // of `atMs`. A deadline never fires before its time: wait out the rest.
      if (Date.now() < atMs) { this.arm(key, atMs, fire); return }
      this.timers.delete(key)
      fire()
    }, Math.max(0, atMs - Date.now()))
    timer.unref()
    this.timers.set(key, timer)
  }

  disarm (key: string): void {
    const timer = this.timers.get(key)
    if (timer !== undefined) clearTimeout(timer)
    this.timers.delete(key)
  }

  /** Deadlines armed now. */
  get size (): number {
    return this.timers.size
  }

  stop (): void {
    for (const timer of this.timers.values()) clearTimeout(timer)
    this.timers.clear()
  }
}
