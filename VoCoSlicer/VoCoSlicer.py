"""VoCoSlicer: set-up of the extension (environment check, dependency install) and the model manager.

Thin Slicer module. It also ships the shared packages of the extension: ``VoCoSlicerLib`` (Slicer glue, imported
by all three modules) and ``vocoslicer`` (the engine, run only in child processes: ``PythonSlicer -m vocoslicer``).
"""

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

from VoCoSlicerLib import deps, models_view
from VoCoSlicerLib.engine import python_executable
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.state import JobState

PYTHON_SETTING = "VoCoSlicer/PythonExecutable"  # read by VoCoSegment and VoCoPretrain too
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
                                 "and finetune, VoCo Pretrain for self-supervised pre-training.")
        self.parent.acknowledgementText = _("VoCo (Wu et al.) and PUMIT (Luo et al.); built on MONAI and PyTorch.")


@parameterNodeWrapper
class VoCoSlicerParameterNode:
    """Set-up options."""

    forceReinstall: bool = False
    pythonExecutable: pathlib.Path


class VoCoSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: environment report, install/repair, model manager."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._rows = []
        self._listing = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoSlicerLogic()
        self.envDriver = JobDriver(_("Check environment"), on_finished=self._onEnvironment)
        self.modelsDriver = JobDriver(_("Models"), on_finished=self._onModelsJob)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        table = self.ui.modelsTableWidget
        table.setHorizontalHeaderLabels(list(models_view.COLUMNS))
        table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.environmentTableWidget.setHorizontalHeaderLabels([_("Item"), _("Value")])
        self.ui.pythonPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Executable
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.checkEnvironmentButton.connect("clicked(bool)", self.onCheckEnvironment)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.onPythonChanged)
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
        self.envDriver.cancel()
        self.modelsDriver.cancel()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self):
        import VoCoSlicerLib

        VoCoSlicerLib.reload_package()
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def _python(self):
        return python_executable(str(qt.QSettings().value(PYTHON_SETTING, "") or ""))

    def onPythonChanged(self, path):
        qt.QSettings().setValue(PYTHON_SETTING, "" if path in ("", ".") else path)

    # ------------------------------------------------------------------ environment
    def onCheckEnvironment(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to check the environment.")):
            self.envDriver.start([["env", "--json"]], run_dir=slicer.util.tempDirectory(), python=self._python())
            self._timer.start()
            self._updateGUI()

    def _onEnvironment(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.adviceLabel.text = _("The environment probe failed: ") + driver.state.message
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to read the environment report.")):
            report = deps.EnvReport.from_json(driver.json_output())
            rows = report.rows()
            table = self.ui.environmentTableWidget
            table.setRowCount(len(rows))
            for i, (item, value) in enumerate(rows):
                table.setItem(i, 0, qt.QTableWidgetItem(item))
                table.setItem(i, 1, qt.QTableWidgetItem(value))
            table.resizeColumnsToContents()
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
        self.modelsDriver.start([args], run_dir=slicer.util.tempDirectory() if self._listing else None,
                                python=self._python())
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
                p = pathlib.Path(path)
                self._startModelsJob(models_view.import_args(str(p.parent if p.name == "model.json" else p)))

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
        with slicer.util.tryWithErrorDisplay(_("Failed to read the model list.")):
            self._rows = models_view.parse_catalog(driver.json_output())
            table = self.ui.modelsTableWidget
            table.setRowCount(len(self._rows))
            for i, row in enumerate(self._rows):
                for j, text in enumerate(row.cells()):
                    item = qt.QTableWidgetItem(text)
                    item.setToolTip(row.description or row.path)
                    table.setItem(i, j, item)
            table.resizeColumnsToContents()
            installed = sum(r.installed for r in self._rows)
            self.ui.modelsStatusLabel.text = _("{n} installed, {m} available").format(
                n=installed, m=len(self._rows) - installed)

    # ------------------------------------------------------------------ polling
    def _onTimer(self):
        for driver in (self.envDriver, self.modelsDriver):
            if driver.busy:
                with slicer.util.tryWithErrorDisplay(_("Job monitoring failed.")):
                    driver.tick()
        if not (self.envDriver.busy or self.modelsDriver.busy):
            self._timer.stop()
        self._updateGUI()

    def _updateGUI(self):
        self.ui.checkEnvironmentButton.enabled = not self.envDriver.busy
        busy = self.modelsDriver.busy
        for button in (self.ui.refreshModelsButton, self.ui.downloadModelButton, self.ui.importModelButton,
                       self.ui.removeModelButton):
            button.enabled = not busy
        view = self.modelsDriver.state.view()
        self.ui.modelsProgressBar.visible = busy
        self.ui.modelsProgressBar.maximum = 0 if view.progress_percent < 0 else 100
        self.ui.modelsProgressBar.value = max(view.progress_percent, 0)
        if busy:
            self.ui.modelsStatusLabel.text = view.progress_text
        self.ui.environmentProgressBar.visible = self.envDriver.busy
        self.ui.environmentProgressBar.maximum = 0
        self.ui.logTextEdit.setPlainText("\n".join([*self.envDriver.log, *self.modelsDriver.log]))


class VoCoSlicerLogic(ScriptedLoadableModuleLogic):
    """Dependency installation (needs the Slicer app: PyTorch extension, slicer.packaging dialogs).

    What to install is decided by ``VoCoSlicerLib.deps`` (tested in pytest); this class only calls Slicer.
    """

    def getParameterNode(self):
        return VoCoSlicerParameterNode(super().getParameterNode())

    def installDependencies(self, requirementsPath, force=False):
        """PyTorch through the PyTorch extension (right CUDA build) when absent or below the floor MONAI needs,
        then the pinned engine packages with ``slicer.packaging``; ``force`` reinstalls those packages (torch
        stays: PyTorch Utils manages its build).

        Slicer's own numpy and SimpleITK and the installed torch are frozen by a constraints file, so pip
        reports a conflict instead of replacing them. Nothing is installed, and nothing restarts, in testing mode
        (pip_ensure's ``skip_in_testing``, applied to every path here), and torch is never imported to decide:
        its metadata is read instead (PyTorchUtils' ``torchInstalled()`` imports it).
        """
        # first statement: it binds the local name ``slicer``. slicer/__init__.py does not import the submodule,
        # so hasattr(slicer, "packaging") is False in a fresh session (Slicer's module template imports it too).
        try:
            import slicer.packaging
        except ImportError:  # Slicer < 5.12, which the module files refuse before getting here
            raise RuntimeError(_("VoCoSlicer needs 3D Slicer 5.12 or later (slicer.packaging).")) from None
        if slicer.app.testingEnabled():
            import logging

            logging.info("VoCoSlicer: testing mode, dependency installation skipped")
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

    def _wait(self, driver, timeout=300):
        import time

        deadline = time.time() + timeout
        while driver.busy and time.time() < deadline:
            driver.tick()
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)

    def test_environment_and_catalog(self):
        driver = JobDriver("test")
        driver.start([["env", "--json"]], run_dir=slicer.util.tempDirectory())
        self._wait(driver)
        report = deps.EnvReport.from_json(driver.json_output())
        self.assertTrue(report.python)
        driver.start([models_view.list_args()], run_dir=slicer.util.tempDirectory())
        self._wait(driver)
        self.assertTrue(models_view.parse_catalog(driver.json_output()), "empty model catalog")
        self.delayDisplay("Test passed")
