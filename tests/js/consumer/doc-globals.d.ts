// The names the docs' code blocks use without defining them (an app's own objects), typed as an app
// would have them. tests/test_js_package.py compiles every JavaScript/TypeScript block of README.md,
// clients/js/README.md and docs/FRONTEND.md against the packed client's types with these in scope.
type Candle = import("@candle-gateway/client").Candle;
type StreamState = import("@candle-gateway/client").StreamState;

declare const id: string;
declare const jobId: string;
declare const token: string;
/** Firebase Auth's current user. */
declare const auth: { currentUser: { getIdToken(forceRefresh?: boolean): Promise<string> } };
declare const getToken: (forceRefresh: boolean) => Promise<string>;
/** One chart per interval. */
declare const charts: Record<string, { update(points: Candle[]): void; append(points: Candle[]): void }>;
declare const chart: { append(points: Candle[]): void };
declare function render(state: StreamState): void;
declare function showError(code: string, message: string): void;
declare function showIntervalError(interval: string | null, message: string): void;
declare function reopenWithAFreshToken(): void;
/** An app's chart component. */
declare function CandleChart(props: { title: string; candles: readonly Candle[]; progress: number }): import("react").ReactNode;
