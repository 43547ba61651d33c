/**
 * A watch that never gives up: client-node's Watch ends on any error (a 429 right after a CRD
 * is established, a timeout, an API server restart) and this restarts it with a backoff. Each
 * restart watches without a resourceVersion, so the server replays every object as ADDED: a
 * full re-list, which a level-triggered reconciler needs and nothing more.
 */
import { Watch, type KubeConfig, type KubernetesObject } from '@kubernetes/client-node';
import type { Logger } from '../common/log.ts';
import { counter } from '../common/metrics.ts';

const restarts = counter('mg_operator_watch_restarts_total', 'Watches the operator restarted after an error or a server close', ['resource']);
const events = counter('mg_operator_watch_events_total', 'Watch events received', ['resource', 'type']);

export interface WatchHandle {
  stop(): void;
}

export function watchForever(
  kc: KubeConfig, path: string, query: Record<string, string>, log: Logger,
  onEvent: (type: string, obj: KubernetesObject) => void,
): WatchHandle {
  const watch = new Watch(kc);
  let stopped = false;
  let abort: AbortController | undefined;
  let failures = 0;
  const start = async (): Promise<void> => {
    if (stopped) return;
    const ended = new Promise<unknown>((resolve) => {
      watch.watch(path, { ...query, allowWatchBookmarks: false }, (type, obj) => {
        failures = 0;
        events.inc({ resource: path, type });
        onEvent(type, obj as KubernetesObject);
      }, resolve).then((a) => (abort = a), resolve);
    });
    const err = await ended;
    if (stopped) return;
    restarts.inc({ resource: path });
    failures++;
    const delay = Math.min(10_000, 100 * 2 ** Math.min(failures, 7));
    if (err) log.warn({ path, err: (err as Error).message ?? String(err), retryInMs: delay }, 'watch ended with an error; restarting');
    setTimeout(() => void start(), delay);
  };
  void start();
  return {
    stop() {
      stopped = true;
      abort?.abort();
    },
  };
}
