"""VoCoSlicer: set-up of the extension (environment check, dependency install) and the model manager.

Thin Slicer module. It also ships the shared packages of the extension: ``VoCoSlicerLib`` (Slicer glue, imported
by all three modules) and ``vocoslicer`` (the engine, run only in child processes: ``PythonSlicer -m vocoslicer``).
"""

import sys

from VoCoSlicerLib.compat import unsupported_message

if unsupported_message(sys.version_info):  # older Slicer: this message, not an error from newer code below
    try:
        import slicer

        slicer.util.errorDisplay(unsupported_message(sys.version_info), windowTitle="VoCoSlicer")
    finally:
        raise ImportError(unsupported_message(sys.version_info))

import pathlib

import ctk
import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VoCoSlicerLib import deps, engine, models_view, module_support, panels
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.state import JobState

DOCS = "https://github.com/vocoslicer/VoCoSlicer#readme"
MIN_TORCH = deps.TORCH_REQUIREMENT  # MONAI's own torch floor (VoCoSlicerLib.deps)


class VoCoSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCoSlicer")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Set up VoCoSlicer: check PyTorch, CUDA and the GPU, install or repair the Python "
                                 "packages, and download, import or remove models. Use VoCo Segment to segment "
                                 "and finetune, VoCo Pretrain for self-supervised pre-training.") + \
            f' <a href="{DOCS}">' + _("Documentation") + "</a>"
        self.parent.acknowledgementText = _("VoCo (Wu et al.) and PUMIT (Luo et al.); built on MONAI and PyTorch.")


@parameterNodeWrapper
class VoCoSlicerParameterNode:
    """Set-up options."""

    forceReinstall: bool = False  # "Python for jobs" is an application setting (QSettings), not per scene


class VoCoSlicerWidget(module_support.PanelPlumbing, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: environment report, install/repair, model manager."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic, self._rows, self._listing = None, [], False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoSlicerLogic()
        engine.set_startup_environment(slicer.util.startupEnvironment)  # for a "Python for jobs" not Slicer's own
        self.envDriver = JobDriver(_("Check environment"), on_finished=self._onEnvironment)
        self.modelsDriver = JobDriver(_("Models"), on_finished=self._onModelsJob)
        self.logView = module_support.LogFollower()
        self._tick = module_support.TimerTick(lambda text: slicer.util.errorDisplay(text, windowTitle="VoCoSlicer"))
        self.ui.logTextEdit.setMaximumBlockCount(2000)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        table = self.ui.modelsTableWidget
        table.setHorizontalHeaderLabels(list(models_view.COLUMNS))
        table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.environmentTableWidget.setHorizontalHeaderLabels([_("Item"), _("Value")])
        self.ui.pythonPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Executable
        self.ui.pythonPathLineEdit.currentPath = module_support.read_python(qt.QSettings())  # before connecting
        self.observeSceneClose(slicer.mrmlScene)
        self.ui.checkEnvironmentButton.connect("clicked(bool)", self.onCheckEnvironment)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.onPythonChanged)
        self.ui.pythonResetButton.connect("clicked(bool)", self.onPythonReset)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.openCacheButton.connect("clicked(bool)", self.onOpenCache)
        self.initializeParameterNode()
        self.onRefreshModels()
        self._updateGUI()

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()
        for driver in (self.envDriver, self.modelsDriver):
            driver.cancel()

    def _python(self):
        return module_support.job_python(qt.QSettings())

    def onPythonChanged(self, path):
        module_support.write_python(qt.QSettings(), path)

    def onPythonReset(self):  # the path field emits nothing for an empty text: clearing needs its own button
        module_support.write_python(qt.QSettings(), "")
        self.ui.pythonPathLineEdit.currentPath = ""

    # ------------------------------------------------------------------ environment
    def onCheckEnvironment(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to check the environment.")):
            run = module_support.scratch_dir(slicer.util.tempDirectory())
            self.envDriver.start([["env", "--json"]], run_dir=run, python=self._python(), temp_paths=[run])
            self._timer.start()
            self._updateGUI()

    def _onEnvironment(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.adviceLabel.text = _("The environment probe failed: ") + driver.state.message
            return
        report = deps.EnvReport.from_json(driver.json_output())  # runs in the timer tick: it reports errors once
        module_support.fill_table(self.ui.environmentTableWidget, report.rows(), qt.QTableWidgetItem)
        self.ui.adviceLabel.text = "\n".join(report.advice()) or _("Ready: PyTorch and all packages found.")

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to install dependencies."), waitCursor=True):
            self.logic.installDependencies(self.resourcePath("requirements.txt"), self._parameterNode.forceReinstall)
            self.onCheckEnvironment()

    # ------------------------------------------------------------------ models
    def onRefreshModels(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to list models.")):
            self._startModelsJob(models_view.list_args())

    def _startModelsJob(self, args):
        """One model command; a listing keeps a run folder (its JSON is read back), others report events on
        stdout (download progress) and are followed by a fresh listing."""
        if self.modelsDriver.busy:
            raise RuntimeError(_("Another model operation is running."))
        self._listing = args == models_view.list_args()
        run = module_support.scratch_dir(slicer.util.tempDirectory()) if self._listing else None
        self.modelsDriver.start([args], run_dir=run, python=self._python(), temp_paths=[run] if run else [])
        self._timer.start()
        self._updateGUI()

    def _selectedRow(self):
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0 or row >= len(self._rows):
            raise ValueError(_("Select a model in the table first."))
        return self._rows[row]

    def onDownloadModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to download the model.")):
            self._startModelsJob(models_view.download_args(self._selectedRow()))

    def onImportModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model.")):
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Import a model bundle or checkpoint"), "",
                _("Model bundles and checkpoints (*.zip *.pt *.pth *.safetensors model.json)"))
            if path:
                self._startModelsJob(models_view.import_args(path))

    def onRemoveModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to remove the model.")):
            row = self._selectedRow()
            if not row.installed:
                raise ValueError(_("This model is not installed."))
            if slicer.util.confirmOkCancelDisplay(_("Delete {model} from this computer?").format(
                    model=f"{row.id} {row.version}")):
                self._startModelsJob(models_view.remove_args(row))

    def onOpenCache(self):
        folder = models_view.models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _onModelsJob(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.modelsStatusLabel.text = driver.state.message or driver.state.state.value
            return
        if not self._listing:
            qt.QTimer.singleShot(0, self.onRefreshModels)  # after this job's bookkeeping is over
            return
        self._rows = models_view.parse_catalog(driver.json_output())  # in the timer tick: errors reported once
        module_support.fill_table(self.ui.modelsTableWidget, [r.cells() for r in self._rows], qt.QTableWidgetItem,
                                  [r.description or r.path for r in self._rows])
        self.ui.modelsStatusLabel.text = models_view.status_text(self._rows)

    # ------------------------------------------------------------------ polling
    def _onTimer(self):  # one report per tick, no re-entry while a dialog is open (module_support.TimerTick)
        self._tick([*[(d.state.action, d.tick) for d in (self.envDriver, self.modelsDriver) if d.busy],
                    (_("Panel update"), self._updateGUI)])
        if not (self.envDriver.busy or self.modelsDriver.busy):
            self._timer.stop()

    def _updateGUI(self):
        self.ui.checkEnvironmentButton.enabled = not self.envDriver.busy
        busy = self.modelsDriver.busy
        for button in (self.ui.refreshModelsButton, self.ui.downloadModelButton, self.ui.importModelButton,
                       self.ui.removeModelButton):
            button.enabled = not busy
        panels.show_progress(panels.job_widgets(self.modelsDriver), self.ui.modelsProgressBar, busy)
        if busy:
            self.ui.modelsStatusLabel.text = self.modelsDriver.state.view().progress_text
        self.ui.environmentProgressBar.visible = self.envDriver.busy
        self.ui.environmentProgressBar.maximum = 0
        self.logView.show(self.ui.logTextEdit, [("", self.envDriver.log), ("", self.modelsDriver.log)])


class VoCoSlicerLogic(ScriptedLoadableModuleLogic):
    """Dependency installation (needs the Slicer app: PyTorch extension, slicer.packaging dialogs).

    What to install is decided by ``VoCoSlicerLib.deps`` (tested in pytest); this class only calls Slicer.
    """

    def getParameterNode(self):
        return VoCoSlicerParameterNode(super().getParameterNode())

    def installDependencies(self, requirementsPath, force=False):
        """torch through the PyTorch extension when absent or below MONAI's floor, then the pinned packages with
        ``slicer.packaging`` (``force`` reinstalls them, not torch); Slicer's numpy/SimpleITK and torch are frozen by
        a constraints file. Nothing is installed or restarted in testing mode; torch is never imported to decide."""
        # first statement (binds the local ``slicer``): slicer/__init__.py never imports this submodule
        try:
            import slicer.packaging
        except ImportError:  # Slicer < 5.12, which the module files refuse before getting here
            raise RuntimeError(_("VoCoSlicer needs 3D Slicer 5.12 or later (slicer.packaging).")) from None
        if slicer.app.testingEnabled():  # self-tests never install or restart
            return
        if deps.torch_install_needed(deps.installed_torch()):
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("The PyTorch extension is missing: install 'PyTorch' from the Extensions "
                                     "Manager, restart Slicer and try again.")) from None
            # installTorch imports torch once it has installed it (PyTorchUtils' own behaviour)
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                             torchVersionRequirement=MIN_TORCH) is None:
                raise RuntimeError(_("PyTorch was not installed (cancelled or failed); see the PyTorch Utils "
                                     "module to choose a CUDA version."))
        constraints = deps.write_constraints(pathlib.Path(slicer.util.tempDirectory()) / "constraints.txt")
        if not force:
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirementsPath),
                                        constraints=constraints, requester="VoCoSlicer")
            return
        plan = deps.install_plan(deps.requirement_lines(requirementsPath), constraints, force=True)
        if not slicer.util.confirmOkCancelDisplay(
                _("VoCoSlicer will reinstall these Python packages:") + "\n" + "\n".join(plan.install)):
            return
        slicer.packaging.pip_install(plan.install, constraints=plan.constraints,
                                     no_deps_requirements=plan.no_deps_requirements(), requester="VoCoSlicer")
        # the engine runs in child processes, so new packages need no restart unless the Slicer process loaded one
        if deps.loaded_requirements(plan.install) and slicer.util.confirmYesNoDisplay(
                _("Packages reinstalled. Restart Slicer now to use them?")):
            slicer.util.restart()


class VoCoSlicerTest(ScriptedLoadableModuleTest):
    """In-app test: environment probe and model catalog through real child processes (no installs)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_environment_and_catalog()

    def _run(self, driver, args, timeout=300):
        driver.start([args], run_dir=slicer.util.tempDirectory())
        self.assertTrue(module_support.wait_for(driver, slicer.app.processEvents, timeout), "job timed out")
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)
        return driver.json_output()

    def test_environment_and_catalog(self):
        driver = JobDriver("test")
        self.assertTrue(deps.EnvReport.from_json(self._run(driver, ["env", "--json"])).python)
        self.assertTrue(models_view.parse_catalog(self._run(driver, models_view.list_args())), "empty model catalog")
        self.delayDisplay("Test passed")
